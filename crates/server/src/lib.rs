//! tsubame's SMTP server: listeners, mio event loops, connections and sessions.
//!
//! Shape: one or more event-loop threads, each with its own `mio::Poll`, its own
//! connection slab and its own copy (dup) of every listening socket; whichever loop
//! accepts a connection owns it for its whole life. Messages are appended to the shared
//! [`Spool`]; its committer thread syncs them in groups and publishes commit notices,
//! which reach each loop through a channel and its `mio::Waker`. A loop sends 250 only
//! for messages a successful notice covers.
#![forbid(unsafe_code)]

pub mod conversation;
mod event_loop;
mod login;
pub mod rates;
pub mod received;
pub mod session;
pub mod sink;
pub mod tls;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;

use tsubame_config::{Config, ListenerConfig};
use tsubame_policy::LoginGuard;
use tsubame_spool::{Spool, SpooledMessage};

use crate::rates::RatePolicy;
use crate::tls::{ReloadableTls, TlsConfigError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start event loop: {source}")]
    EventLoop {
        #[source]
        source: std::io::Error,
    },
    #[error("listener {address}: {source}")]
    Tls {
        address: SocketAddr,
        #[source]
        source: TlsConfigError,
    },
    #[error("{0}")]
    Policy(#[from] tsubame_policy::Error),
    #[error("{reason}")]
    Reload { reason: String },
}

/// A listener's settings and its certificate.
#[derive(Debug)]
pub(crate) struct Listener {
    pub config: ListenerConfig,
    /// Shared by every [`Policy`] generation: a configuration reload keeps the listener's
    /// socket and certificate files (those change only at restart); SIGHUP reloads the
    /// certificate in place.
    pub tls: Option<Arc<ReloadableTls>>,
}

/// What a connection's session is judged by: the configuration, the listeners' policy
/// (relay networks, auth requirements), the rate limits and the login guard. Replaced
/// as a whole by a reload; a connection keeps the one it was accepted under, so a
/// session in progress finishes on the rules it started with.
pub(crate) struct Policy {
    pub config: Arc<Config>,
    /// By the index of the listener in the configuration. Invariant: as many as the
    /// bound listeners, in the same order, in every generation.
    pub listeners: Vec<Arc<Listener>>,
    pub login_guard: Arc<Mutex<LoginGuard>>,
    pub rates: Arc<RatePolicy>,
    /// The login cache's epoch for `config`'s accounts (see `login::LoginCache`).
    pub accounts_epoch: u64,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("listeners", &self.listeners.len())
            .field("users", &self.config.users.len())
            .finish_non_exhaustive()
    }
}

/// State every loop shares.
pub(crate) struct Shared {
    /// The policy new connections get. Read only when `policy_generation` moved (once
    /// per poll iteration at most), never per command.
    pub policy: RwLock<Arc<Policy>>,
    /// Bumped after every store to `policy`.
    pub policy_generation: AtomicU64,
    pub spool: Spool,
    /// Called once per message whose record is durable (its client heard or will hear
    /// 250), from an event-loop thread: must not block.
    pub handoff: Handoff,
    /// Who watches live conversations (`tsubame trace`).
    pub observer: Arc<dyn conversation::Observer>,
    pub hostname: String,
    pub logins: login::LoginPool,
    pub shutdown: AtomicBool,
    /// Connections open over all loops. Invariant: equals the sum of `per_ip`.
    pub connections: AtomicUsize,
    pub per_ip: Mutex<HashMap<IpAddr, usize>>,
    pub stats: Arc<ServerStats>,
}

/// What the event loops count, for `/metrics`. Monotonic counters since the start,
/// added to with relaxed atomics (one add per connection or handshake, never per byte).
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections admitted.
    pub connections_accepted: AtomicU64,
    /// Connections refused by `max_connections` or `max_connections_per_ip`.
    pub connections_refused: AtomicU64,
    /// TLS handshakes completed (STARTTLS or implicit TLS).
    pub tls_handshakes: AtomicU64,
    /// TLS handshakes that failed.
    pub tls_handshake_failures: AtomicU64,
    /// Logins refused: a wrong password or an unknown user.
    pub login_failures: AtomicU64,
    /// Logins refused because the address or account is locked out after failures.
    pub login_lockouts: AtomicU64,
}

/// A running server's counters and its open connections, for `/metrics`.
#[derive(Debug, Clone)]
pub struct StatsHandle {
    shared: Arc<Shared>,
}

impl StatsHandle {
    pub fn counters(&self) -> &ServerStats {
        &self.shared.stats
    }

    /// Connections open now, over every loop.
    pub fn open_connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("hostname", &self.hostname)
            .field("connections", &self.connections)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The policy new connections get now.
    pub fn current_policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Counts a new connection, or says which limit (of `limits`) refuses it.
    pub fn admit(
        &self,
        ip: IpAddr,
        limits: &tsubame_config::Limits,
    ) -> Result<(), session::Admission> {
        if self.connections.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(session::Admission::TooManyConnections);
        }
        let mut per_ip = self
            .per_ip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= limits.max_connections_per_ip {
            drop(per_ip);
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(session::Admission::TooManyFromAddress);
        }
        *count += 1;
        Ok(())
    }

    /// Uncounts a closed connection.
    pub fn release(&self, ip: IpAddr) {
        let mut per_ip = self
            .per_ip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = per_ip.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&ip);
            }
        }
        drop(per_ip);
        self.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A running server. Dropping it does not stop it; call [`RunningServer::shutdown`] and
/// then [`RunningServer::wait`].
#[derive(Debug)]
pub struct RunningServer {
    shared: Arc<Shared>,
    wakers: Vec<Arc<mio::Waker>>,
    threads: Vec<JoinHandle<()>>,
    /// The addresses actually bound (a configured port 0 becomes the real port).
    pub local_addresses: Vec<SocketAddr>,
}

impl RunningServer {
    /// Asks every loop to stop: listeners close, idle sessions get `421 4.3.2`, messages
    /// waiting for their commit still get their answer.
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        for waker in &self.wakers {
            if let Err(error) = waker.wake() {
                tracing::warn!(%error, "cannot wake an event loop for shutdown");
            }
        }
    }

    /// A handle that can ask for shutdown from another thread (a signal handler thread).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: Arc::clone(&self.shared),
            wakers: self.wakers.clone(),
        }
    }

    /// The counters, readable while the server runs.
    pub fn stats(&self) -> StatsHandle {
        StatsHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Waits until every loop has stopped.
    pub fn wait(self) {
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::error!("an event loop thread panicked");
            }
        }
    }
}

/// Asks a running server to stop; cheap to clone and send to other threads.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
    wakers: Vec<Arc<mio::Waker>>,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        for waker in &self.wakers {
            let _ = waker.wake();
        }
    }

    /// Reads every listener's certificate and key again (SIGHUP). Connections keep the
    /// certificate they started with; new handshakes get the new one. A listener whose
    /// files do not load keeps its old certificate, and the log says why. Returns the
    /// number of listeners that failed.
    pub fn reload_certificates(&self) -> usize {
        let mut failed = 0;
        let policy = self.shared.current_policy();
        for listener in &policy.listeners {
            let Some(tls) = &listener.tls else {
                continue;
            };
            let address = listener.config.address;
            match tls.reload() {
                Ok(()) => tracing::info!(%address, "certificate reloaded"),
                Err(error) => {
                    failed += 1;
                    tracing::error!(%address, %error, "certificate not reloaded; the old one stays in use");
                }
            }
        }
        failed
    }

    /// Puts `config` in force for new connections (see [`ShutdownHandle::prepare_reload`]).
    pub fn reload(&self, config: Arc<Config>) -> Result<(), ServerError> {
        let prepared = self.prepare_reload(config)?;
        self.install(prepared);
        Ok(())
    }

    /// Builds the policy `config` asks for without putting it in force, so that a caller
    /// reloading several parts can check them all first: users (the login cache is
    /// emptied when they change), limits, relay networks, auth requirements, rate limits
    /// and the login guard (both kept, with their counts, when their settings are
    /// unchanged). [`ShutdownHandle::install`] puts it in force; open connections finish
    /// on the configuration they started with.
    ///
    /// What the server cannot change while running stays as it is: the listeners'
    /// addresses, modes and certificate files, the host name and the event-loop count
    /// (the caller warns about those). A configuration with a different number of
    /// listeners is refused.
    pub fn prepare_reload(&self, config: Arc<Config>) -> Result<PreparedReload, ServerError> {
        let old = self.shared.current_policy();
        if config.listeners.len() != old.listeners.len() {
            return Err(ServerError::Reload {
                reason: format!(
                    "{} listeners configured, {} bound: listeners change only at restart",
                    config.listeners.len(),
                    old.listeners.len()
                ),
            });
        }
        let listeners = old
            .listeners
            .iter()
            .zip(&config.listeners)
            .map(|(bound, wanted)| {
                Arc::new(Listener {
                    config: ListenerConfig {
                        address: bound.config.address,
                        mode: bound.config.mode,
                        certificate_file: bound.config.certificate_file.clone(),
                        key_file: bound.config.key_file.clone(),
                        ..wanted.clone()
                    },
                    tls: bound.tls.clone(),
                })
            })
            .collect();
        let login_guard = if config.login_guard == old.config.login_guard {
            Arc::clone(&old.login_guard)
        } else {
            Arc::new(Mutex::new(LoginGuard::new(config.login_guard)?))
        };
        let rates = if config.rate_limits == old.config.rate_limits {
            Arc::clone(&old.rates)
        } else {
            Arc::new(RatePolicy::new(&config.rate_limits)?)
        };
        let users_changed = config.users != old.config.users;
        Ok(PreparedReload {
            policy: Policy {
                config,
                listeners,
                login_guard,
                rates,
                // Set by `install`: a new epoch when the accounts changed.
                accounts_epoch: old.accounts_epoch,
            },
            users_changed,
        })
    }

    /// Puts a prepared policy in force for new connections.
    pub fn install(&self, prepared: PreparedReload) {
        let PreparedReload {
            mut policy,
            users_changed,
        } = prepared;
        policy.accounts_epoch = if users_changed {
            // A removed account or a changed password must not log in from memory, not
            // even from a check of the old accounts that finishes after this.
            self.shared.logins.cache.new_accounts()
        } else {
            self.shared.logins.cache.epoch()
        };
        *self
            .shared
            .policy
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(policy);
        self.shared.policy_generation.fetch_add(1, Ordering::AcqRel);
        // Idle loops pick the new policy up at their next wake-up; no need to wake them:
        // a new connection wakes its loop, and the check comes before the accept.
    }
}

/// A policy built from a reloaded configuration, not yet in force
/// ([`ShutdownHandle::prepare_reload`]).
#[derive(Debug)]
pub struct PreparedReload {
    policy: Policy,
    users_changed: bool,
}

/// Event loops when the config says 0: half the cores, at least one. Most of a loop's
/// time is the kernel's TCP work, and the committer thread and the kernel's softirq work
/// need cores too; on 2 cores one loop used less CPU per message and accepted more
/// messages per second than two (README, BENCHMARKS).
pub fn default_thread_count() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    (cores / 2).max(1)
}

/// The machine's host name, for the greeting when the config names none.
pub fn system_hostname() -> String {
    let name = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    if name.is_empty() {
        "localhost".to_string()
    } else {
        name
    }
}

/// Where accepted messages go once durable: delivery's queue, or nowhere (tests of
/// the accept path). Called on an event-loop thread; it must not block.
pub type Handoff = Arc<dyn Fn(SpooledMessage) + Send + Sync>;

/// What the server reports to the rest of the relay.
#[derive(Clone)]
pub struct Hooks {
    /// Every durable message.
    pub handoff: Handoff,
    /// Conversations someone watches live.
    pub observer: Arc<dyn conversation::Observer>,
}

impl Hooks {
    /// Messages go to `handoff`; nobody watches conversations.
    pub fn new(handoff: Handoff) -> Self {
        Self {
            handoff,
            observer: Arc::new(conversation::Nobody),
        }
    }
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("observer", &self.observer)
            .finish_non_exhaustive()
    }
}

/// Binds every listener and starts the event loops.
pub fn start(
    config: Arc<Config>,
    spool: Spool,
    hooks: Hooks,
) -> Result<RunningServer, ServerError> {
    let Hooks { handoff, observer } = hooks;
    let listeners = event_loop::bind_listeners(&config)?;
    let local_addresses: Vec<SocketAddr> = listeners
        .iter()
        .filter_map(|(listener, _)| listener.local_addr().ok())
        .collect();
    let hostname = config
        .server
        .hostname
        .clone()
        .unwrap_or_else(system_hostname);
    let thread_count = match config.server.threads {
        0 => default_thread_count(),
        threads => threads,
    };
    let mut listener_states = Vec::new();
    for listener in &config.listeners {
        let tls = match (&listener.certificate_file, &listener.key_file) {
            (Some(certificate), Some(key)) => Some(Arc::new(
                ReloadableTls::load(certificate, key).map_err(|source| ServerError::Tls {
                    address: listener.address,
                    source,
                })?,
            )),
            _ => None,
        };
        for relaxation in listener.relaxations() {
            tracing::warn!(address = %listener.address, "RELAXED LISTENER: {relaxation}");
        }
        listener_states.push(Arc::new(Listener {
            config: listener.clone(),
            tls,
        }));
    }
    let logins = login::LoginPool::start(&config, default_thread_count())
        .map_err(|source| ServerError::EventLoop { source })?;
    let login_guard = Arc::new(Mutex::new(LoginGuard::new(config.login_guard)?));
    let rates = Arc::new(RatePolicy::new(&config.rate_limits)?);
    let shared = Arc::new(Shared {
        policy: RwLock::new(Arc::new(Policy {
            config,
            listeners: listener_states,
            login_guard,
            rates,
            accounts_epoch: logins.cache.epoch(),
        })),
        policy_generation: AtomicU64::new(0),
        spool,
        handoff,
        observer,
        hostname,
        logins,
        shutdown: AtomicBool::new(false),
        connections: AtomicUsize::new(0),
        per_ip: Mutex::new(HashMap::new()),
        stats: Arc::new(ServerStats::default()),
    });
    let mut wakers = Vec::new();
    let mut threads = Vec::new();
    for index in 0..thread_count {
        let event_loop = event_loop::EventLoop::new(Arc::clone(&shared), &listeners)
            .map_err(|source| ServerError::EventLoop { source })?;
        wakers.push(event_loop.waker());
        let thread = std::thread::Builder::new()
            .name(format!("smtp-loop-{index}"))
            .spawn(move || event_loop.run())
            .map_err(|source| ServerError::EventLoop { source })?;
        threads.push(thread);
    }
    for address in &local_addresses {
        tracing::info!(%address, threads = thread_count, "listening");
    }
    Ok(RunningServer {
        shared,
        wakers,
        threads,
        local_addresses,
    })
}
