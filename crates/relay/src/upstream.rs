//! The relay's table of upstreams: every configured `[[upstream]]` plus the built-in
//! `mx`, each with what its workers need resolved once at start (EHLO name, timeouts,
//! password, TLS configuration, resolver).

use std::sync::Arc;
use std::time::Duration;

use tsubame_config::{
    AuthMethod, BUILTIN_MX_UPSTREAM, Config, TlsMode, UpstreamConfig, UpstreamKind,
};
use tsubame_delivery::mx::{MxResolver, ResolverOptions};
use tsubame_delivery::{BearerMechanism, Credentials, Secret, Timeouts, TlsSettings};
use tsubame_queue::RouteLimits;

use crate::RelayError;
use crate::tokens::{TokenFailure, TokenSource, TokenSources};

/// How sessions with an upstream log in.
#[derive(Debug, Clone)]
pub(crate) enum Login {
    None,
    /// One username and password for every session.
    Password(Credentials),
    /// An access token per account, from a token source.
    Bearer {
        source: Arc<dyn TokenSource>,
        mechanism: BearerMechanism,
    },
}

/// How often an account's invalid OAuth grant is logged at error level at most.
pub(crate) const GRANT_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Jobs handed out per connection of an upstream: one being sent, one waiting.
const JOBS_PER_CONNECTION: usize = 2;

/// One upstream, ready for workers. Shared (`Arc`) by its workers.
#[derive(Debug)]
pub(crate) struct Upstream {
    /// Position in the table; also the scheduler's `RouteId`.
    pub index: usize,
    pub config: UpstreamConfig,
    pub helo_name: String,
    pub timeouts: Timeouts,
    pub login: Login,
    /// When each account's invalid grant was last logged at error level.
    grant_warnings: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// The TLS mode and client configuration, built once and shared by connections.
    pub tls: TlsSettings,
    /// `mx` upstreams: the DNS resolver (one thread per upstream, shared by its workers).
    pub resolver: Option<MxResolver>,
    /// Named by `default_upstream` or a route. Unused upstreams get no workers and no
    /// resolver (a smarthost-only setup needs no /etc/resolv.conf).
    pub used: bool,
}

impl Upstream {
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The same upstream at another place in the table (a reload appends it).
    pub fn at_index(self, index: usize) -> Self {
        Self { index, ..self }
    }

    /// Whether `fresh` (built from a reloaded configuration) would deliver exactly as
    /// this one does, so this one, with its queue and workers, can stay: the same
    /// settings, EHLO name, use and login (a password file's contents included).
    pub fn same_settings(&self, fresh: &Upstream) -> bool {
        let same_login = match (&self.login, &fresh.login) {
            (Login::None, Login::None) => true,
            (
                Login::Password(Credentials::Password {
                    username: old_name,
                    password: old_password,
                }),
                Login::Password(Credentials::Password {
                    username: new_name,
                    password: new_password,
                }),
            ) => old_name == new_name && old_password.expose() == new_password.expose(),
            // Token sources are built once at start ([[oauth]] changes only at
            // restart), so the upstream's settings decide.
            (Login::Bearer { .. }, Login::Bearer { .. }) => true,
            _ => false,
        };
        same_login
            && self.config == fresh.config
            && self.helo_name == fresh.helo_name
            && self.used == fresh.used
    }

    /// Jobs in flight may be twice the connections: each worker finds its next job
    /// already queued when it finishes one, instead of reporting and sleeping until the
    /// dispatcher hands it another (measured: one wake-up less per message).
    pub fn route_limits(&self) -> RouteLimits {
        RouteLimits {
            max_concurrent: self
                .config
                .max_connections
                .saturating_mul(JOBS_PER_CONNECTION),
            rate_per_second: self.config.rate_per_second,
        }
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.config.idle_timeout_secs)
    }

    /// The daily quota of each account, for the upstreams whose accounts are tracked:
    /// those with a quota, a fallback, or Google's (whose quota replies block an account
    /// for a while). `None` for the rest, whose jobs pay nothing for this.
    pub fn quota_limits(&self) -> Option<crate::quota::QuotaLimits> {
        let config = &self.config;
        let tracked = config.messages_per_day.is_some()
            || config.recipients_per_day.is_some()
            || config.fallback.is_some()
            || matches!(config.kind, UpstreamKind::Gmail | UpstreamKind::GoogleRelay);
        tracked.then_some(crate::quota::QuotaLimits {
            messages_per_day: config.messages_per_day,
            recipients_per_day: config.recipients_per_day,
            reserve_percent: config.quota_reserve_percent,
        })
    }

    /// The account a message from `sender`, submitted by `user`, logs in as: `None`
    /// for upstreams without per-account logins.
    pub fn account_for(&self, user: Option<&str>, sender: &str) -> Option<&str> {
        match self.login {
            Login::Bearer { .. } => self.config.account_for(user, sender),
            Login::None | Login::Password(_) => None,
        }
    }

    /// The credentials for a session as `account`: the password, or a current token.
    pub fn credentials(&self, account: Option<&str>) -> Result<Option<Credentials>, TokenFailure> {
        match &self.login {
            Login::None => Ok(None),
            Login::Password(credentials) => Ok(Some(credentials.clone())),
            Login::Bearer { source, mechanism } => {
                let account = account.ok_or_else(|| TokenFailure {
                    detail: format!(
                        "upstream {:?}: no account for this message (no account_map entry matches and no account is set)",
                        self.name()
                    ),
                    needs_authorization: false,
                })?;
                let token = source.token(account)?;
                Ok(Some(Credentials::Bearer {
                    username: account.to_string(),
                    token,
                    mechanism: *mechanism,
                }))
            }
        }
    }

    /// The upstream accepted the token in `credentials`.
    pub fn token_accepted(&self, credentials: &Credentials) {
        if let (Login::Bearer { source, .. }, Credentials::Bearer { username, .. }) =
            (&self.login, credentials)
        {
            source.accepted(username);
        }
    }

    /// Whether an invalid grant for `account` should be logged at error level now: at
    /// most once per [`GRANT_WARNING_INTERVAL`] per account.
    pub fn should_warn_about_grant(&self, account: &str) -> bool {
        let mut warned = self
            .grant_warnings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        match warned.get(account) {
            Some(last) if now.duration_since(*last) < GRANT_WARNING_INTERVAL => false,
            _ => {
                warned.insert(account.to_string(), now);
                true
            }
        }
    }

    /// The upstream refused the token in `credentials`.
    pub fn token_rejected(&self, credentials: &Credentials) {
        if let (
            Login::Bearer { source, .. },
            Credentials::Bearer {
                username, token, ..
            },
        ) = (&self.login, credentials)
        {
            source.rejected(username, token);
        }
    }
}

/// The upstreams in force (retired ones left out), for looking one up by name (an
/// upstream's `fallback`). A reload replaces the list; a lookup clones an `Arc`.
#[derive(Debug)]
pub(crate) struct ActiveUpstreams(std::sync::RwLock<Arc<Vec<Arc<Upstream>>>>);

impl ActiveUpstreams {
    pub fn new(upstreams: Vec<Arc<Upstream>>) -> Self {
        Self(std::sync::RwLock::new(Arc::new(upstreams)))
    }

    pub fn find(&self, name: &str) -> Option<Arc<Upstream>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|upstream| upstream.name() == name)
            .cloned()
    }

    pub fn replace(&self, upstreams: Vec<Arc<Upstream>>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(upstreams);
    }
}

/// Builds the table: configured upstreams in file order, then `mx` if not configured.
pub(crate) fn build_table(
    config: &Config,
    hostname: &str,
    tokens: &TokenSources,
) -> Result<Vec<Arc<Upstream>>, RelayError> {
    let mut configs: Vec<UpstreamConfig> = config.upstreams.clone();
    if !configs
        .iter()
        .any(|upstream| upstream.name == BUILTIN_MX_UPSTREAM)
    {
        configs.push(UpstreamConfig::mx(BUILTIN_MX_UPSTREAM));
    }
    let default_helo = config
        .delivery
        .ehlo_name
        .clone()
        .unwrap_or_else(|| hostname.to_string());
    configs
        .into_iter()
        .enumerate()
        .map(|(index, upstream)| {
            let login = match upstream.auth_method() {
                None => Login::None,
                Some(AuthMethod::Password) => {
                    let password = upstream
                        .password()
                        .map_err(|message| RelayError::Upstream { message })?;
                    match (&upstream.username, password) {
                        (Some(username), Some(password)) => {
                            Login::Password(Credentials::Password {
                                username: username.clone(),
                                password: Secret::new(password.expose()),
                            })
                        }
                        _ => {
                            return Err(RelayError::Upstream {
                                message: format!(
                                    "upstream {:?} has a username but no password (password_file, password_env, or in the --upstream URL / TSUBAME_UPSTREAM_PASSWORD)",
                                    upstream.name
                                ),
                            });
                        }
                    }
                }
                Some(method @ (AuthMethod::Xoauth2 | AuthMethod::Oauthbearer)) => {
                    let name = upstream.oauth.as_deref().unwrap_or_default();
                    let source = tokens.get(name).cloned().ok_or_else(|| RelayError::Upstream {
                        message: format!(
                            "upstream {:?}: no token source {name:?} was set up",
                            upstream.name
                        ),
                    })?;
                    Login::Bearer {
                        source,
                        mechanism: if method == AuthMethod::Xoauth2 {
                            BearerMechanism::XOAuth2
                        } else {
                            BearerMechanism::OAuthBearer
                        },
                    }
                }
            };
            let has_login = !matches!(login, Login::None);
            // A password goes only to a server whose certificate was checked: with
            // credentials, "opportunistic" means STARTTLS required and verified (an
            // unverified peer could be anyone on the path).
            let mut tls_mode = upstream.tls_mode();
            if has_login && tls_mode == TlsMode::Opportunistic {
                tracing::info!(
                    upstream = upstream.name,
                    "credentials are configured: STARTTLS is required and the certificate checked"
                );
                tls_mode = TlsMode::Required;
            }
            let tls = TlsSettings::new(tls_mode, upstream.ca_file.as_deref()).map_err(
                |error| RelayError::Upstream {
                    message: format!("upstream {:?}: {error}", upstream.name),
                },
            )?;
            let timeouts = match upstream.timeout_secs {
                Some(seconds) => cap_timeouts(Timeouts::default(), Duration::from_secs(seconds)),
                None => Timeouts::default(),
            };
            let helo_name = upstream
                .ehlo_name
                .clone()
                .unwrap_or_else(|| default_helo.clone());
            if upstream.kind.is_relay() && upstream.host().is_none() {
                return Err(RelayError::Upstream {
                    message: format!("upstream {:?} has no host", upstream.name),
                });
            }
            let used = upstream.name == config.delivery.default_upstream
                || config
                    .routes
                    .iter()
                    .any(|route| route.upstream == upstream.name)
                || config
                    .users
                    .iter()
                    .any(|user| user.upstream.as_deref() == Some(upstream.name.as_str()))
                || config
                    .upstreams
                    .iter()
                    .any(|other| other.fallback.as_deref() == Some(upstream.name.as_str()))
                || (upstream.name == BUILTIN_MX_UPSTREAM
                    && config.upstreams.iter().any(|other| other.fallback.as_deref() == Some(BUILTIN_MX_UPSTREAM)));
            let resolver = match upstream.kind {
                UpstreamKind::Mx if used => Some(
                    MxResolver::new(ResolverOptions {
                        nameserver: upstream.nameserver,
                        ..ResolverOptions::default()
                    })
                    .map_err(|error| RelayError::Upstream {
                        message: format!("upstream {:?}: {error}", upstream.name),
                    })?,
                ),
                _ => None,
            };
            Ok(Arc::new(Upstream {
                index,
                config: upstream,
                helo_name,
                timeouts,
                login,
                grant_warnings: std::sync::Mutex::default(),
                tls,
                resolver,
                used,
            }))
        })
        .collect()
}

/// Every wait at most `cap` (an upstream's `timeout_secs`).
fn cap_timeouts(timeouts: Timeouts, cap: Duration) -> Timeouts {
    Timeouts {
        connect: timeouts.connect.min(cap),
        greeting: timeouts.greeting.min(cap),
        mail: timeouts.mail.min(cap),
        rcpt: timeouts.rcpt.min(cap),
        data_initiation: timeouts.data_initiation.min(cap),
        data_block: timeouts.data_block.min(cap),
        data_termination: timeouts.data_termination.min(cap),
        tls_handshake: timeouts.tls_handshake.min(cap),
    }
}
