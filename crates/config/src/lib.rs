//! tsubame's configuration: one TOML file turned into validated, typed settings.
//!
//! Every error names the line and column it came from ([`ConfigError`]). Every limit has
//! a default here, next to the reason for its value; the README's config reference lists
//! the same keys.
#![forbid(unsafe_code)]

pub mod delivery;
pub mod dkim;
pub mod listener;
pub mod oauth;
mod reload;
pub mod users;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use delivery::{
    AccountMapping, AuthMethod, BUILTIN_MX_UPSTREAM, DeliveryConfig, GMAIL_HOST, GOOGLE_RELAY_HOST,
    RouteConfig, Secret, TlsMode, UpstreamConfig, UpstreamKind, domain_matches, parse_upstream_url,
};
pub use dkim::{DKIM_DOMAINS_MAX, DkimConfig, DkimKeyConfig, LIST_UNSUBSCRIBE_BYTES_MAX};
pub use listener::{
    ListenerConfig, ListenerMode, ListenerProfile, LoginGuardConfig, RateLimitConfig,
    RateLimitTable, default_relay_networks,
};
pub use oauth::{OAuthConfig, OAuthKind};
pub use users::{PasswordHashText, SenderPattern, User, Users, VerifyError};

/// Most DKIM signing threads: signing is CPU work, and more threads than cores only
/// add switching.
pub const SIGNING_THREADS_MAX: usize = 256;

/// The configuration the relay starts on when no file is given: listen on
/// 127.0.0.1:2525, spool in `./spool`, relay for loopback clients only.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// A fully validated configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    /// Invariant after validation: at least one listener.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub delivery_log: DeliveryLogConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// Named upstreams; `mx` (direct delivery) exists without being configured.
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,
    /// Tried in order; the first match names the upstream.
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// Token sources for OAuth2 logins to upstreams.
    #[serde(default, rename = "oauth")]
    pub oauth_sources: Vec<OAuthConfig>,
    /// DKIM signing domains and their keys.
    #[serde(default, rename = "dkim")]
    pub dkim: Vec<DkimConfig>,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub rate_limits: RateLimitConfig,
    #[serde(default)]
    pub login_guard: LoginGuardConfig,
    /// Device accounts for SMTP AUTH: this file's `[[user]]` entries and, after
    /// [`Config::load`], those of `auth.users_file` after them.
    #[serde(default, rename = "user")]
    pub users: Users,
}

/// `[auth]`: where device accounts come from besides the `[[user]]` entries here.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// A file of `[[user]]` entries (what `tsubame user add` edits), read by
    /// [`Config::load`]. A relative path is taken from the working directory, like the
    /// spool directory. Keep it mode 0600.
    #[serde(default)]
    pub users_file: Option<PathBuf>,
    /// How long a successful login is remembered, so that the same name and password
    /// log in again without another argon2 check (tens of milliseconds of CPU each). The
    /// password is kept only as an HMAC under a key made at start and never written
    /// anywhere. 0 turns the cache off.
    #[serde(default = "default_login_cache_secs")]
    pub login_cache_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            users_file: None,
            login_cache_secs: default_login_cache_secs(),
        }
    }
}

/// One hour: a device that sends every few minutes pays for one argon2 check an hour.
fn default_login_cache_secs() -> u64 {
    3600
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The name in the greeting and the EHLO reply. Default: the machine's host name.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Event-loop threads; 0 means half the cores, at least one.
    #[serde(default)]
    pub threads: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    #[serde(default = "default_spool_directory")]
    pub directory: PathBuf,
    /// Size each segment file is preallocated to.
    #[serde(default = "default_segment_size_bytes")]
    pub segment_size_bytes: u64,
}

fn default_spool_directory() -> PathBuf {
    PathBuf::from("./spool")
}

/// 64 MiB, the spool crate's default.
fn default_segment_size_bytes() -> u64 {
    64 * 1024 * 1024
}

/// Smallest segment we accept: below this, segment creation (fallocate plus two fsyncs)
/// would happen every few messages.
pub const SEGMENT_SIZE_BYTES_MIN: u64 = 1024 * 1024;

/// Largest segment: the spool format's limit (`tsubame_spool::MAX_SEGMENT_SIZE_BYTES`,
/// 256 MiB; the binary's tests check the two agree), so check-config refuses what the
/// spool would refuse at start.
pub const SEGMENT_SIZE_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// RFC 5321 §4.5.3.1.4: a command line of 512 octets must be accepted.
pub const COMMAND_LINE_BYTES_MIN: u64 = 512;
/// RFC 5321 §4.5.3.1.6: a text line of 1000 octets must be accepted.
pub const TEXT_LINE_BYTES_MIN: u64 = 1000;
/// RFC 5321 §4.5.3.1.8: at least 100 recipients per message must be accepted.
pub const RECIPIENTS_MIN: u64 = 100;
/// Longest retry delay: the scheduler's own cap (`tsubame_queue::MAX_RETRY_DELAY_MS`),
/// 30 days, far past any sensible `max_age_secs`.
pub const RETRY_DELAY_SECS_MAX: u64 = 30 * 24 * 3600;
/// Most entries in `retry_schedule_secs`: the scheduler's `MAX_SCHEDULE_ENTRIES`.
pub const RETRY_SCHEDULE_ENTRIES_MAX: usize = 64;

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            directory: default_spool_directory(),
            segment_size_bytes: default_segment_size_bytes(),
        }
    }
}

/// Limits on what clients may do. Every one is answered with an SMTP reply.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections open at once, over all listeners. Beyond it: `421 4.7.0` and close.
    pub max_connections: usize,
    /// Connections open at once from one client IP address. Beyond it: `421 4.7.0`.
    pub max_connections_per_ip: usize,
    /// Message size, advertised with SIZE (RFC 1870). Beyond it: `552 5.3.4`.
    pub max_message_size_bytes: u64,
    /// Recipients per message. The excess gets `452 4.5.3` (RFC 5321 §4.5.3.1.10).
    pub max_recipients: usize,
    /// One command line including CRLF. Beyond it: `500 5.5.6`.
    pub max_command_line_bytes: usize,
    /// One line of message text including CRLF. Beyond it: `554 5.6.0` after DATA.
    pub max_text_line_bytes: usize,
    /// Commands in one session. Beyond it: `421 4.7.0` and close.
    pub max_commands_per_session: u32,
    /// Error replies in one session. Beyond it: `421 4.7.0` and close.
    pub max_errors_per_session: u32,
    /// Waiting for the next command (RFC 5321 §4.5.3.2.7: at least 5 minutes).
    pub command_timeout_secs: u64,
    /// Waiting for the next block of DATA or BDAT content (RFC 5321 §4.5.3.2.5).
    pub data_block_timeout_secs: u64,
    /// Whole DATA or BDAT transfer of one message, however fast the blocks come.
    pub data_total_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            // Notification systems open many sessions from one host; 500 leaves room for
            // 200-session load tests while still bounding one misbehaving client.
            max_connections_per_ip: 500,
            max_message_size_bytes: 50 * 1024 * 1024,
            max_recipients: 1_000,
            // RFC 5321 §4.5.3.1.4 says 512 for the command line, but ESMTP parameters
            // and UTF-8 addresses push past it; RFC 4954 §4 allows 12288 for AUTH.
            max_command_line_bytes: 12_288,
            // RFC 5321 §4.5.3.1.6 says 1000 octets. Real mail (generated HTML) breaks it
            // often, so we accept up to 64 KiB per line and refuse only beyond that.
            max_text_line_bytes: 64 * 1024,
            max_commands_per_session: 10_000,
            max_errors_per_session: 20,
            command_timeout_secs: 300,
            data_block_timeout_secs: 180,
            data_total_timeout_secs: 600,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter: `info`, `debug`, `tsubame_server=debug,info`, ...
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_string(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `[delivery_log]`: one JSON line per delivery event (received, delivered, deferred,
/// bounced, expired), for operators and `tsubame log`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryLogConfig {
    pub enabled: bool,
    /// The current file; rotated files sit beside it. `None`: `delivery.log` in the
    /// spool directory (see [`DeliveryLogConfig::path_in`]).
    pub path: Option<PathBuf>,
    /// The current file is rotated before it grows past this, and at each UTC day change.
    /// Invariant after validation: at least [`DELIVERY_LOG_SIZE_BYTES_MIN`].
    pub max_size_bytes: u64,
    /// Rotated files older than this many days are deleted. Invariant after
    /// validation: 1..=[`DELIVERY_LOG_RETENTION_DAYS_MAX`].
    pub retention_days: u32,
}

/// Smallest rotation size: a few dozen event lines; below it a file would be rotated
/// every few events (and one line could never fit).
pub const DELIVERY_LOG_SIZE_BYTES_MIN: u64 = 4096;

/// Longest retention: ten years; a larger number is more likely a typo than a policy.
pub const DELIVERY_LOG_RETENTION_DAYS_MAX: u32 = 3650;

impl Default for DeliveryLogConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: None,
            // 100 MiB: about half a million events per file.
            max_size_bytes: 100 * 1024 * 1024,
            retention_days: 30,
        }
    }
}

impl DeliveryLogConfig {
    /// The current file's path for a server whose spool is `spool_directory`.
    pub fn path_in(&self, spool_directory: &Path) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| spool_directory.join("delivery.log"))
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.max_size_bytes < DELIVERY_LOG_SIZE_BYTES_MIN {
            return Err((
                "max_size_bytes",
                format!("max_size_bytes must be at least {DELIVERY_LOG_SIZE_BYTES_MIN}"),
            ));
        }
        if !(1..=DELIVERY_LOG_RETENTION_DAYS_MAX).contains(&self.retention_days) {
            return Err((
                "retention_days",
                format!("retention_days must be 1 to {DELIVERY_LOG_RETENTION_DAYS_MAX}"),
            ));
        }
        if self
            .path
            .as_ref()
            .is_some_and(|path| path.as_os_str().is_empty() || path.file_name().is_none())
        {
            return Err(("path", "path must name a file".to_string()));
        }
        Ok(())
    }
}

/// `[admin]`: the admin HTTP server (`/metrics`, `/api/…`, the web page). Off by
/// default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub enabled: bool,
    /// Where it listens. Invariant after validation: a loopback address, or
    /// `token_file` is set.
    pub address: std::net::SocketAddr,
    /// A file holding the bearer token every request must carry
    /// (`Authorization: Bearer TOKEN`); required when `address` is not loopback. Read
    /// at start; at least [`ADMIN_TOKEN_BYTES_MIN`] bytes after trimming.
    pub token_file: Option<PathBuf>,
}

/// Shortest admin token: 128 bits of hex.
pub const ADMIN_TOKEN_BYTES_MIN: usize = 32;

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            address: std::net::SocketAddr::from(([127, 0, 0, 1], 8025)),
            token_file: None,
        }
    }
}

impl AdminConfig {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.enabled && !self.address.ip().is_loopback() && self.token_file.is_none() {
            // The `[admin]` line: "address" would find the first listener's.
            return Err((
                "admin",
                format!(
                    "the admin server on {} (not loopback) needs token_file: anyone who reaches it could read the log and delete mail",
                    self.address
                ),
            ));
        }
        if self
            .token_file
            .as_ref()
            .is_some_and(|path| path.as_os_str().is_empty())
        {
            return Err(("token_file", "token_file must name a file".to_string()));
        }
        Ok(())
    }

    /// Reads the bearer token from `token_file` (`None` when none is configured). The
    /// error names the file, never its content.
    pub fn read_token(&self) -> Result<Option<Secret>, String> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("admin token_file {}: {error}", path.display()))?;
        let token = text.trim();
        if token.len() < ADMIN_TOKEN_BYTES_MIN {
            return Err(format!(
                "admin token_file {}: the token must be at least {ADMIN_TOKEN_BYTES_MIN} characters (e.g. `openssl rand -hex 32`)",
                path.display()
            ));
        }
        if token.chars().any(|c| !c.is_ascii_graphic()) {
            return Err(format!(
                "admin token_file {}: the token must be one word of printable ASCII",
                path.display()
            ));
        }
        Ok(Some(Secret::new(token.to_string())))
    }
}

/// A configuration error with its place in the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}:{line}:{column}: {message}")]
    Invalid {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
}

impl Config {
    /// The embedded default configuration.
    pub fn embedded_default() -> Result<Config, ConfigError> {
        Self::parse(EMBEDDED_DEFAULT, "<embedded default>")
    }

    /// Reads and validates a configuration file.
    /// Reads and validates a configuration file, and the users file it names.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read_text(path)?;
        let mut config = Self::parse(&text, &path.display().to_string())?;
        if let Some(users_path) = config.auth.users_file.clone() {
            let text = read_text(&users_path)?;
            let origin = users_path.display().to_string();
            let users = parse_users_text(&text, &origin)?;
            let known = |name: &str| config.upstream(name).is_some();
            let mut check = users::check_upstreams(&users, known);
            if check.is_ok() {
                check = users.iter().enumerate().try_for_each(|(index, user)| {
                    match config.users.find(&user.name) {
                        Some(_) => Err((
                            Place::Entry {
                                table: "user",
                                index,
                                key: "name",
                            },
                            format!("user {:?} is also defined in {}", user.name, path.display()),
                        )),
                        None => Ok(()),
                    }
                });
            }
            check.map_err(|(place, message)| invalid_at(&text, &origin, place, message))?;
            config.users.push_all(users);
            config
                .users
                .check()
                .map_err(|(_, message)| invalid_at(&text, &origin, Place::Key("user"), message))?;
        }
        Ok(config)
    }

    /// Parses and validates configuration text; `origin` names it in errors.
    /// Does no I/O: `auth.users_file` is read by [`Config::load`] only.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = from_toml(text, origin)?;
        config
            .validate()
            .map_err(|(key, message)| (Place::Key(key), message))
            .and_then(|()| config.validate_delivery())
            .and_then(|()| config.validate_users())
            .map_err(|(place, message)| invalid_at(text, origin, place, message))?;
        Ok(config)
    }

    /// Checks the `[[user]]` entries of this file: unique names, known upstreams.
    fn validate_users(&self) -> Result<(), (Place, String)> {
        self.users.check().map_err(|(index, message)| {
            (
                Place::Entry {
                    table: "user",
                    index,
                    key: "name",
                },
                message,
            )
        })?;
        users::check_upstreams(&self.users, |name| self.upstream(name).is_some())
    }

    /// Checks a configuration changed after loading (command-line overrides) again.
    pub fn revalidate(&self) -> Result<(), String> {
        self.validate()
            .map_err(|(_, message)| message)
            .and_then(|()| self.validate_delivery().map_err(|(_, message)| message))
            .and_then(|()| self.validate_users().map_err(|(_, message)| message))
    }

    /// Checks what types alone cannot. Returns the offending key and a message.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.listeners.is_empty() {
            return Err((
                "listener",
                "at least one [[listener]] is required".to_string(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for listener in &self.listeners {
            if !seen.insert(listener.address) {
                return Err((
                    "address",
                    format!("listener {} is configured twice", listener.address),
                ));
            }
            listener.validate()?;
        }
        self.rate_limits.validate()?;
        self.delivery_log.validate()?;
        self.admin.validate()?;
        listener::validate_login_guard(&self.login_guard)?;
        if self.spool.segment_size_bytes < SEGMENT_SIZE_BYTES_MIN {
            return Err((
                "segment_size_bytes",
                format!("segment_size_bytes must be at least {SEGMENT_SIZE_BYTES_MIN}"),
            ));
        }
        let limits = &self.limits;
        let positive: [(&'static str, u64); 10] = [
            ("max_connections", limits.max_connections as u64),
            (
                "max_connections_per_ip",
                limits.max_connections_per_ip as u64,
            ),
            ("max_message_size_bytes", limits.max_message_size_bytes),
            ("max_recipients", limits.max_recipients as u64),
            (
                "max_commands_per_session",
                u64::from(limits.max_commands_per_session),
            ),
            (
                "max_errors_per_session",
                u64::from(limits.max_errors_per_session),
            ),
            ("command_timeout_secs", limits.command_timeout_secs),
            ("data_block_timeout_secs", limits.data_block_timeout_secs),
            ("data_total_timeout_secs", limits.data_total_timeout_secs),
            ("max_text_line_bytes", limits.max_text_line_bytes as u64),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err((key, format!("{key} must be greater than 0")));
            }
        }
        // The protocol's own minimums: a server must accept at least these.
        let minimums: [(&'static str, u64, u64, &str); 3] = [
            (
                "max_command_line_bytes",
                limits.max_command_line_bytes as u64,
                COMMAND_LINE_BYTES_MIN,
                "§4.5.3.1.4",
            ),
            (
                "max_text_line_bytes",
                limits.max_text_line_bytes as u64,
                TEXT_LINE_BYTES_MIN,
                "§4.5.3.1.6",
            ),
            (
                "max_recipients",
                limits.max_recipients as u64,
                RECIPIENTS_MIN,
                "§4.5.3.1.8",
            ),
        ];
        for (key, value, minimum, section) in minimums {
            if value < minimum {
                return Err((
                    key,
                    format!("{key} must be at least {minimum} (RFC 5321 {section})"),
                ));
            }
        }
        if self.spool.segment_size_bytes > SEGMENT_SIZE_BYTES_MAX {
            return Err((
                "segment_size_bytes",
                format!("segment_size_bytes must be at most {SEGMENT_SIZE_BYTES_MAX}"),
            ));
        }
        if let Err(error) = self.log.level.parse::<LogLevelCheck>() {
            return Err(("level", error));
        }
        Ok(())
    }

    /// Checks upstreams and routes; errors point into the offending `[[upstream]]` or
    /// `[[route]]` entry.
    fn validate_delivery(&self) -> Result<(), (Place, String)> {
        let in_upstream = |index: usize| {
            move |(key, message): (&'static str, String)| {
                (
                    Place::Entry {
                        table: "upstream",
                        index,
                        key,
                    },
                    message,
                )
            }
        };
        let mut names = std::collections::HashSet::new();
        for (index, upstream) in self.upstreams.iter().enumerate() {
            upstream.validate().map_err(in_upstream(index))?;
            if upstream.name == BUILTIN_MX_UPSTREAM && upstream.kind != UpstreamKind::Mx {
                return Err(in_upstream(index)((
                    "name",
                    format!(
                        "the upstream name {BUILTIN_MX_UPSTREAM:?} is reserved for direct delivery"
                    ),
                )));
            }
            if !names.insert(upstream.name.as_str()) {
                return Err(in_upstream(index)((
                    "name",
                    format!("upstream {:?} is configured twice", upstream.name),
                )));
            }
        }
        let known = |name: &str| name == BUILTIN_MX_UPSTREAM || names.contains(name);
        let mut sources = std::collections::HashSet::new();
        for (index, source) in self.oauth_sources.iter().enumerate() {
            let in_source = |(key, message): (&'static str, String)| {
                (
                    Place::Entry {
                        table: "oauth",
                        index,
                        key,
                    },
                    message,
                )
            };
            source.validate().map_err(in_source)?;
            if !sources.insert(source.name.as_str()) {
                return Err(in_source((
                    "name",
                    format!("oauth source {:?} is configured twice", source.name),
                )));
            }
        }
        for (index, upstream) in self.upstreams.iter().enumerate() {
            if let Some(source) = &upstream.oauth
                && !sources.contains(source.as_str())
            {
                return Err(in_upstream(index)((
                    "oauth",
                    format!(
                        "upstream {:?}: oauth names {source:?}, which is not an [[oauth]] source",
                        upstream.name
                    ),
                )));
            }
            if let Some(fallback) = &upstream.fallback
                && (!known(fallback) || *fallback == upstream.name)
            {
                return Err(in_upstream(index)((
                    "fallback",
                    format!(
                        "upstream {:?}: fallback names {fallback:?}, which is not another [[upstream]]",
                        upstream.name
                    ),
                )));
            }
            if upstream.kind == UpstreamKind::GoogleRelay {
                let ehlo = upstream
                    .ehlo_name
                    .as_deref()
                    .or(self.delivery.ehlo_name.as_deref())
                    .or(self.server.hostname.as_deref());
                if !ehlo.is_some_and(is_fully_qualified) {
                    return Err(in_upstream(index)((
                        "ehlo_name",
                        format!(
                            "upstream {:?} (google-relay): Google's relay refuses EHLO names that are not a fully qualified domain name; set ehlo_name (here, in [delivery], or [server] hostname) to one, e.g. relay.example.com{}",
                            upstream.name,
                            ehlo.map(|name| format!(" (not {name:?})"))
                                .unwrap_or_default()
                        ),
                    )));
                }
            }
        }
        if !known(&self.delivery.default_upstream) {
            return Err((
                Place::Key("default_upstream"),
                format!(
                    "default_upstream names {:?}, which is not an [[upstream]]",
                    self.delivery.default_upstream
                ),
            ));
        }
        self.validate_dkim()?;
        for (index, route) in self.routes.iter().enumerate() {
            let in_route = |key: &'static str, message: String| {
                (
                    Place::Entry {
                        table: "route",
                        index,
                        key,
                    },
                    message,
                )
            };
            if let Some(domain) = &route.dkim_domain
                && !self.dkim.iter().any(|dkim| {
                    dkim.domain
                        .trim_end_matches('.')
                        .eq_ignore_ascii_case(domain.trim_end_matches('.'))
                })
            {
                return Err(in_route(
                    "dkim_domain",
                    format!(
                        "a [[route]] signs with dkim_domain {domain:?}, which has no [[dkim]] entry"
                    ),
                ));
            }
            if let Some(value) = &route.list_unsubscribe {
                dkim::check_list_unsubscribe(value, route.list_unsubscribe_post)
                    .map_err(|message| in_route("list_unsubscribe", message))?;
            } else if route.list_unsubscribe_post {
                return Err(in_route(
                    "list_unsubscribe_post",
                    "list_unsubscribe_post needs list_unsubscribe (RFC 8058 section 3.1)"
                        .to_string(),
                ));
            }
            if !known(&route.upstream) {
                return Err((
                    Place::Entry {
                        table: "route",
                        index,
                        key: "upstream",
                    },
                    format!(
                        "a [[route]] names upstream {:?}, which is not an [[upstream]]",
                        route.upstream
                    ),
                ));
            }
        }
        if self.delivery.max_age_secs == 0 {
            return Err((
                Place::Key("max_age_secs"),
                "max_age_secs must be greater than 0".to_string(),
            ));
        }
        let delivery = &self.delivery;
        if delivery.signing_threads > SIGNING_THREADS_MAX {
            return Err((
                Place::Key("signing_threads"),
                format!("signing_threads must be at most {SIGNING_THREADS_MAX} (0: one per CPU)"),
            ));
        }
        if delivery.retry_initial_secs == 0 {
            return Err((
                Place::Key("retry_initial_secs"),
                "retry_initial_secs must be greater than 0".to_string(),
            ));
        }
        if !delivery.retry_factor.is_finite() || delivery.retry_factor < 1.0 {
            return Err((
                Place::Key("retry_factor"),
                "retry_factor must be a number of at least 1".to_string(),
            ));
        }
        if delivery.retry_max_secs < delivery.retry_initial_secs {
            return Err((
                Place::Key("retry_max_secs"),
                "retry_max_secs must be at least retry_initial_secs".to_string(),
            ));
        }
        if delivery.retry_max_secs > RETRY_DELAY_SECS_MAX {
            return Err((
                Place::Key("retry_max_secs"),
                format!("retry_max_secs must be at most {RETRY_DELAY_SECS_MAX} (30 days)"),
            ));
        }
        if let Some(schedule) = &delivery.retry_schedule_secs {
            if schedule.is_empty() || schedule.len() > RETRY_SCHEDULE_ENTRIES_MAX {
                return Err((
                    Place::Key("retry_schedule_secs"),
                    format!("retry_schedule_secs needs 1 to {RETRY_SCHEDULE_ENTRIES_MAX} entries"),
                ));
            }
            if schedule
                .iter()
                .any(|&delay| delay == 0 || delay > RETRY_DELAY_SECS_MAX)
            {
                return Err((
                    Place::Key("retry_schedule_secs"),
                    format!(
                        "each retry_schedule_secs entry must be between 1 and {RETRY_DELAY_SECS_MAX}"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks the `[[dkim]]` entries: each valid, no domain twice.
    fn validate_dkim(&self) -> Result<(), (Place, String)> {
        if self.dkim.len() > DKIM_DOMAINS_MAX {
            return Err((
                Place::Key("dkim"),
                format!("at most {DKIM_DOMAINS_MAX} [[dkim]] entries"),
            ));
        }
        let mut domains = std::collections::HashSet::new();
        for (index, dkim) in self.dkim.iter().enumerate() {
            let in_entry = |(key, message): (&'static str, String)| {
                (
                    Place::Entry {
                        table: "dkim",
                        index,
                        key,
                    },
                    message,
                )
            };
            dkim.validate().map_err(in_entry)?;
            let domain = dkim.domain.trim_end_matches('.').to_ascii_lowercase();
            if !domains.insert(domain) {
                return Err(in_entry((
                    "domain",
                    format!("dkim domain {:?} is configured twice", dkim.domain),
                )));
            }
        }
        Ok(())
    }

    /// The `[[dkim]]` entry that signs mail from `domain`: the most specific one covering
    /// it (a subdomain's own entry before its parent's).
    pub fn dkim_for(&self, domain: &str) -> Option<&DkimConfig> {
        dkim::most_specific(&self.dkim, domain).and_then(|index| self.dkim.get(index))
    }

    /// The upstream called `name`: a configured one, or the built-in `mx`.
    pub fn upstream(&self, name: &str) -> Option<UpstreamConfig> {
        self.upstreams
            .iter()
            .find(|upstream| upstream.name == name)
            .cloned()
            .or_else(|| {
                (name == BUILTIN_MX_UPSTREAM).then(|| UpstreamConfig::mx(BUILTIN_MX_UPSTREAM))
            })
    }

    /// Human-readable summary for `check-config`.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for listener in &self.listeners {
            out.push_str(&listener.summary(self.users.len()));
            out.push('\n');
        }
        out.push_str(&format!(
            "spool {} (segments of {} bytes)\n",
            self.spool.directory.display(),
            self.spool.segment_size_bytes
        ));
        let delivery_log = &self.delivery_log;
        if delivery_log.enabled {
            out.push_str(&format!(
                "delivery log {} (rotated at {} bytes and daily, kept {} days)\n",
                delivery_log.path_in(&self.spool.directory).display(),
                delivery_log.max_size_bytes,
                delivery_log.retention_days
            ));
        } else {
            out.push_str("delivery log off\n");
        }
        if self.admin.enabled {
            out.push_str(&format!(
                "admin HTTP on http://{} ({})\n",
                self.admin.address,
                if self.admin.token_file.is_some() {
                    "bearer token required"
                } else {
                    "no token: loopback only"
                }
            ));
        }
        for (index, route) in self.routes.iter().enumerate() {
            let mut conditions = Vec::new();
            if !route.sender_domains.is_empty() {
                conditions.push(format!("sender in {}", route.sender_domains.join(", ")));
            }
            if !route.recipient_domains.is_empty() {
                conditions.push(format!(
                    "recipient in {}",
                    route.recipient_domains.join(", ")
                ));
            }
            if !route.users.is_empty() {
                conditions.push(format!("user in {}", route.users.join(", ")));
            }
            if !route.client_networks.is_empty() {
                let networks: Vec<String> = route
                    .client_networks
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                conditions.push(format!("client in {}", networks.join(", ")));
            }
            if conditions.is_empty() {
                conditions.push("everything".to_string());
            }
            out.push_str(&format!(
                "route {}: {} -> {}\n",
                index + 1,
                conditions.join(" and "),
                route.upstream
            ));
        }
        let mut names: Vec<&str> = self
            .routes
            .iter()
            .map(|route| route.upstream.as_str())
            .collect();
        names.push(&self.delivery.default_upstream);
        names.dedup();
        let mut shown = std::collections::HashSet::new();
        for name in names {
            if !shown.insert(name) {
                continue;
            }
            let Some(upstream) = self.upstream(name) else {
                continue;
            };
            let target = match upstream.host() {
                Some(host) if upstream.kind.is_relay() => {
                    format!("{host}:{}", upstream.port_number())
                }
                _ => format!(
                    "MX of each recipient domain, port {}",
                    upstream.port_number()
                ),
            };
            let mut login = match (
                upstream.auth_method(),
                &upstream.username,
                &upstream.password_file,
                &upstream.password_env,
            ) {
                (Some(AuthMethod::Xoauth2 | AuthMethod::Oauthbearer), ..) => {
                    let mut accounts: Vec<String> = upstream
                        .account_map
                        .iter()
                        .map(|mapping| {
                            let mut from = Vec::new();
                            if let Some(user) = &mapping.user {
                                from.push(format!("user {user}"));
                            }
                            if let Some(sender) = &mapping.sender {
                                from.push(format!("sender {sender}"));
                            }
                            format!("{} for {}", mapping.account, from.join(" and "))
                        })
                        .collect();
                    if let Some(account) =
                        upstream.account.as_deref().or(upstream.username.as_deref())
                    {
                        accounts.push(format!("{account} otherwise"));
                    }
                    format!(
                        ", AUTH {} with tokens from oauth {:?} as {}",
                        upstream.auth_method().unwrap_or(AuthMethod::Xoauth2),
                        upstream.oauth.as_deref().unwrap_or_default(),
                        accounts.join("; ")
                    )
                }
                (_, Some(user), Some(file), _) => {
                    format!(", AUTH as {user} (password from {})", file.display())
                }
                (_, Some(user), None, Some(variable)) => {
                    format!(", AUTH as {user} (password from ${variable})")
                }
                (_, Some(user), None, None) => format!(", AUTH as {user}"),
                _ => String::new(),
            };
            if upstream.messages_per_day.is_some() || upstream.recipients_per_day.is_some() {
                let quota =
                    |limit: Option<u32>, what: &str| limit.map(|limit| format!("{limit} {what}"));
                let parts: Vec<String> = [
                    quota(upstream.messages_per_day, "messages"),
                    quota(upstream.recipients_per_day, "recipients"),
                ]
                .into_iter()
                .flatten()
                .collect();
                login.push_str(&format!(
                    ", at most {} per account per 24 h",
                    parts.join(" and ")
                ));
            }
            if let Some(fallback) = &upstream.fallback {
                login.push_str(&format!(", fallback {fallback}"));
            }
            let default = if name == self.delivery.default_upstream {
                " (default)"
            } else {
                ""
            };
            out.push_str(&format!(
                "upstream {}{default}: {target}, TLS {:?}{login}, {} connections\n",
                upstream.name,
                upstream.tls_mode(),
                upstream.max_connections
            ));
        }
        let delivery = &self.delivery;
        let retry = match &delivery.retry_schedule_secs {
            Some(schedule) => format!("after {:?} s", schedule),
            None => format!(
                "after {} s, x{} each time, at most {} s apart",
                delivery.retry_initial_secs, delivery.retry_factor, delivery.retry_max_secs
            ),
        };
        out.push_str(&format!(
            "retries {retry}; bounce after {} s in the queue\n",
            delivery.max_age_secs
        ));
        if !self.users.is_empty() || self.auth.users_file.is_some() {
            let from = match &self.auth.users_file {
                Some(path) => format!(" (users file {})", path.display()),
                None => String::new(),
            };
            out.push_str(&format!(
                "{} device account(s) for AUTH{from}\n",
                self.users.len()
            ));
        }
        if let Some(rates) = self.rate_limits.summary() {
            out.push_str(&rates);
            out.push('\n');
        }
        if !self.users.is_empty() {
            out.push_str(&listener::login_guard_summary(&self.login_guard));
            out.push('\n');
        }
        let limits = &self.limits;
        out.push_str(&format!(
            "limits: message {} bytes, {} recipients, {} connections ({} per IP)\n",
            limits.max_message_size_bytes,
            limits.max_recipients,
            limits.max_connections,
            limits.max_connections_per_ip
        ));
        out
    }
}

fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A name Google's relay accepts in EHLO: a domain name with at least two labels, not
/// an address literal, not `localhost`.
fn is_fully_qualified(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    let labels: Vec<&str> = name.split('.').collect();
    labels.len() >= 2
        && !name.eq_ignore_ascii_case("localhost.localdomain")
        && name.parse::<std::net::IpAddr>().is_err()
        && labels.iter().all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
        })
        && labels
            .last()
            .is_some_and(|top| top.bytes().any(|byte| byte.is_ascii_alphabetic()))
}

/// Deserializes TOML; a syntax or type error names its line and column.
fn from_toml<T: serde::de::DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|error| {
        let (line, column) = error
            .span()
            .map(|span| line_and_column(text, span.start))
            .unwrap_or((1, 1));
        ConfigError::Invalid {
            origin: origin.to_string(),
            line,
            column,
            message: error.message().to_string(),
        }
    })
}

fn invalid_at(text: &str, origin: &str, place: Place, message: String) -> ConfigError {
    let (line, column) = place.locate(text);
    ConfigError::Invalid {
        origin: origin.to_string(),
        line,
        column,
        message,
    }
}

/// Reads a users file (`[[user]]` entries only) on its own, checking everything but
/// the upstream names, which only the configuration knows: for `tsubame user` without
/// a configuration.
pub fn load_users_file(path: &Path) -> Result<Users, ConfigError> {
    parse_users_text(&read_text(path)?, &path.display().to_string())
}

/// Parses users-file text; `origin` names it in errors. Upstream names are not checked.
pub fn parse_users_text(text: &str, origin: &str) -> Result<Users, ConfigError> {
    let file: users::UsersFile = from_toml(text, origin)?;
    file.users.check().map_err(|(index, message)| {
        let place = Place::Entry {
            table: "user",
            index,
            key: "name",
        };
        invalid_at(text, origin, place, message)
    })?;
    Ok(file.users)
}

/// A light check of a log filter: directives separated by commas, each `level` or
/// `target=level`. The binary builds the real filter; this catches typos with a line.
struct LogLevelCheck;

impl std::str::FromStr for LogLevelCheck {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
        for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            let level = directive.rsplit('=').next().unwrap_or(directive);
            if !directive.contains('=') && !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
                return Err(format!(
                    "unknown log level {level:?} (use one of {})",
                    LEVELS.join(", ")
                ));
            }
        }
        Ok(LogLevelCheck)
    }
}

/// 1-based line and column of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |tail| tail.chars().count())
        + 1;
    (line, column)
}

/// Where a validation error points in the file.
#[derive(Debug, Clone, Copy)]
enum Place {
    /// The first occurrence of a key (or of a `[table]`/`[[table]]` header of that name).
    Key(&'static str),
    /// `key` inside the `index`-th `[[table]]` entry, or that entry's header when the key
    /// is absent.
    Entry {
        table: &'static str,
        index: usize,
        key: &'static str,
    },
}

impl Place {
    fn locate(self, text: &str) -> (usize, usize) {
        match self {
            Place::Key(key) => locate_key(text, key),
            Place::Entry { table, index, key } => locate_in_entry(text, table, index, key),
        }
    }
}

fn locate_in_entry(text: &str, table: &str, index: usize, key: &str) -> (usize, usize) {
    let header = format!("[[{table}]]");
    let mut lines = text.lines().enumerate();
    let Some((header_line, _)) = lines
        .by_ref()
        .filter(|(_, line)| line.trim_start().starts_with(&header))
        .nth(index)
    else {
        return locate_key(text, key);
    };
    for (number, line) in lines {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            break;
        }
        if trimmed
            .strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
        {
            return (number + 1, line.len() - trimmed.len() + 1);
        }
    }
    (header_line + 1, 1)
}

/// Where a key (or a `[[table]]` header) first appears, for errors found after parsing.
fn locate_key(text: &str, key: &str) -> (usize, usize) {
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let is_key = trimmed
            .strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='));
        let is_table =
            trimmed.starts_with(&format!("[[{key}]]")) || trimmed.starts_with(&format!("[{key}]"));
        if is_key || is_table {
            return (index + 1, line.len() - trimmed.len() + 1);
        }
    }
    (1, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> (usize, usize, String) {
        invalid(Config::parse(text, "test.toml"))
    }

    /// The line, column and message of a result that must be `ConfigError::Invalid`.
    pub(crate) fn invalid(
        result: Result<impl std::fmt::Debug, ConfigError>,
    ) -> (usize, usize, String) {
        match result {
            Err(ConfigError::Invalid {
                line,
                column,
                message,
                ..
            }) => (line, column, message),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn embedded_default_is_loopback_only() {
        let config = Config::embedded_default().unwrap();
        assert_eq!(config.listeners.len(), 1);
        assert_eq!(
            config.listeners[0].address,
            "127.0.0.1:2525".parse().unwrap()
        );
        assert_eq!(config.listeners[0].relay_networks, default_relay_networks());
        assert_eq!(config.spool.directory, PathBuf::from("./spool"));
        assert_eq!(config.limits, Limits::default());
    }

    #[test]
    fn full_file_parses() {
        let config = Config::parse(
            r#"
[server]
hostname = "relay.example.com"
threads = 2

[[listener]]
address = "0.0.0.0:25"
relay_networks = ["192.168.0.0/16"]

[[listener]]
address = "[::1]:587"

[spool]
directory = "/var/spool/tsubame"
segment_size_bytes = 16777216

[limits]
max_recipients = 200
max_message_size_bytes = 1048576

[log]
level = "debug"
format = "json"
"#,
            "t",
        )
        .unwrap();
        assert_eq!(config.server.hostname.as_deref(), Some("relay.example.com"));
        assert_eq!(
            config.listeners[0].relay_networks,
            vec!["192.168.0.0/16".parse::<ipnet::IpNet>().unwrap()]
        );
        assert_eq!(config.listeners[1].relay_networks, default_relay_networks());
        assert_eq!(config.limits.max_recipients, 200);
        assert_eq!(
            config.limits.max_connections,
            Limits::default().max_connections
        );
        assert_eq!(config.log.format, LogFormat::Json);
    }

    #[test]
    fn errors_carry_line_and_column() {
        let cases: &[(&str, usize, &str)] = &[
            (
                "[[listener]]\naddress = \"nonsense\"\n",
                2,
                "invalid socket address",
            ),
            (
                "[[listener]]\naddress = \"127.0.0.1:25\"\nrelay_networks = [\"10.0.0.0/33\"]\n",
                3,
                "invalid IP",
            ),
            (
                "[[listener]]\naddress = \"127.0.0.1:25\"\n\n[limits]\nmax_recipeints = 5\n",
                5,
                "unknown field",
            ),
            (
                "[[listener]]\naddress = \"127.0.0.1:25\"\n[limits]\nmax_recipients = 0\n",
                4,
                "max_recipients",
            ),
            (
                "[spool]\ndirectory = \"x\"\n",
                1,
                "at least one [[listener]]",
            ),
            (
                "[[listener]]\naddress = \"127.0.0.1:25\"\n[log]\nlevel = \"loud\"\n",
                4,
                "unknown log level",
            ),
            (
                "[[listener]]\naddress = \"127.0.0.1:25\"\n[limits]\nmax_command_line_bytes = 100\n",
                4,
                "at least 512",
            ),
        ];
        for (text, want_line, want_message) in cases {
            let (line, _column, message) = error_of(text);
            assert_eq!(line, *want_line, "{text:?}: {message}");
            assert!(message.contains(want_message), "{text:?}: {message}");
        }
    }

    #[test]
    fn upstreams_and_routes() {
        let config = Config::parse(
            r#"
[[listener]]
address = "127.0.0.1:25"

[delivery]
default_upstream = "relay"

[[upstream]]
name = "relay"
kind = "smtp"
host = "smtp.example.net"
username = "device"
password_env = "RELAY_PASSWORD"

[[route]]
recipient_domains = [".example.org"]
upstream = "mx"
"#,
            "t",
        )
        .unwrap();
        let relay = config.upstream("relay").unwrap();
        assert_eq!(
            (relay.port_number(), relay.tls_mode()),
            (587, TlsMode::Required)
        );
        assert_eq!(config.upstream("mx").unwrap().kind, UpstreamKind::Mx);
        assert!(config.upstream("nope").is_none());
        assert_eq!(config.routes[0].upstream, "mx");
        let summary = config.summary();
        for expected in [
            "route 1: recipient in .example.org -> mx",
            "upstream mx: MX of each recipient domain, port 25, TLS Opportunistic",
            "upstream relay (default): smtp.example.net:587, TLS Required, AUTH as device \
             (password from $RELAY_PASSWORD)",
        ] {
            assert!(
                summary.contains(expected),
                "{expected:?} not in:\n{summary}"
            );
        }
        assert_eq!(
            Config::embedded_default()
                .unwrap()
                .delivery
                .default_upstream,
            "mx"
        );
    }

    #[test]
    fn the_admin_server_is_off_by_default_and_needs_a_token_off_loopback() {
        let base = "[[listener]]\naddress = \"127.0.0.1:25\"\n";
        let config = Config::parse(base, "test.toml").expect("defaults");
        assert!(!config.admin.enabled);
        assert_eq!(config.admin.address.to_string(), "127.0.0.1:8025");
        assert!(!config.summary().contains("admin"));
        let on = format!("{base}[admin]\nenabled = true\n");
        let config = Config::parse(&on, "test.toml").expect("loopback without a token");
        assert!(
            config
                .summary()
                .contains("admin HTTP on http://127.0.0.1:8025 (no token: loopback only)")
        );
        let open = format!("{base}[admin]\nenabled = true\naddress = \"0.0.0.0:8025\"\n");
        let error = Config::parse(&open, "test.toml").expect_err("0.0.0.0 without a token");
        let text = error.to_string();
        assert!(text.contains("test.toml:3"), "{text}");
        assert!(text.contains("needs token_file"), "{text}");
        let ipv6 = format!("{base}[admin]\nenabled = true\naddress = \"[::1]:8025\"\n");
        assert!(Config::parse(&ipv6, "test.toml").is_ok());
        // Off, a public address needs nothing: it is never bound.
        let off = format!("{base}[admin]\naddress = \"0.0.0.0:8025\"\n");
        assert!(Config::parse(&off, "test.toml").is_ok());

        let directory = tempfile::tempdir().expect("tempdir");
        let path = directory.path().join("token");
        let with_token = |path: &Path| AdminConfig {
            enabled: true,
            address: "0.0.0.0:8025".parse().expect("address"),
            token_file: Some(path.to_path_buf()),
        };
        let short = "0123456789abcdef0123456789abcde"; // 31 characters
        std::fs::write(&path, format!("{short}\n")).expect("write");
        let error = with_token(&path).read_token().expect_err("31 characters");
        assert!(error.contains("at least 32 characters"), "{error}");
        assert!(!error.contains(short), "the error shows the token: {error}");
        std::fs::write(&path, format!("{short}f\n")).expect("write");
        let token = with_token(&path).read_token().expect("32 characters");
        assert_eq!(
            token.map(|t| t.expose().to_string()),
            Some(format!("{short}f"))
        );
        std::fs::write(&path, "0123456789abcdef 0123456789abcdef").expect("write");
        assert!(with_token(&path).read_token().is_err(), "two words");
        let missing = with_token(&directory.path().join("absent")).read_token();
        assert!(missing.is_err_and(|error| error.contains("absent")));
        assert!(matches!(AdminConfig::default().read_token(), Ok(None)));
    }

    #[test]
    fn delivery_log_settings_are_checked_with_their_line() {
        let base = "[[listener]]\naddress = \"127.0.0.1:25\"\n[delivery_log]\n";
        let config = Config::parse(base, "test.toml").expect("defaults");
        assert!(config.delivery_log.enabled);
        assert_eq!(config.delivery_log.max_size_bytes, 100 * 1024 * 1024);
        assert_eq!(config.delivery_log.retention_days, 30);
        assert!(config.summary().contains(
            "delivery log ./spool/delivery.log (rotated at 104857600 bytes and daily, kept 30 days)"
        ));
        assert_eq!(
            config.delivery_log.path_in(Path::new("/var/spool/tsubame")),
            Path::new("/var/spool/tsubame/delivery.log")
        );
        let cases: &[(&str, usize, &str)] = &[
            ("max_size_bytes = 10\n", 4, "at least 4096"),
            (
                "retention_days = 0\n",
                4,
                "retention_days must be 1 to 3650",
            ),
            (
                "\nretention_days = 4000\n",
                5,
                "retention_days must be 1 to 3650",
            ),
            ("path = \"\"\n", 4, "path must name a file"),
            ("enabled = true\nrotate = 1\n", 5, "unknown field"),
        ];
        for (tail, want_line, want_message) in cases {
            let text = format!("{base}{tail}");
            let (line, _column, message) = error_of(&text);
            assert_eq!(line, *want_line, "{text:?}: {message}");
            assert!(message.contains(want_message), "{text:?}: {message}");
        }
    }

    #[test]
    fn delivery_errors_carry_line() {
        let base = "[[listener]]\naddress = \"127.0.0.1:25\"\n";
        let cases: &[(&str, usize, &str)] = &[
            (
                "[[route]]\nupstream = \"ghost\"\n",
                4,
                "not an [[upstream]]",
            ),
            (
                "[delivery]\ndefault_upstream = \"ghost\"\n",
                4,
                "not an [[upstream]]",
            ),
            (
                "[[upstream]]\nname = \"r\"\nkind = \"smtp\"\n",
                3,
                "needs a host",
            ),
            (
                "[[upstream]]\nname = \"r\"\nkind = \"mx\"\nhost = \"x\"\n",
                6,
                "kind mx",
            ),
            (
                "[[upstream]]\nname = \"r\"\nkind = \"smtp\"\nhost = \"x\"\npassword_env = \"P\"\n",
                3,
                "needs a username",
            ),
            (
                "[[upstream]]\nname = \"r\"\nkind = \"smtp\"\nhost = \"x\"\nusername = \"u\"\npassword_env = \"P\"\ntls = \"none\"\n",
                9,
                "never sent without TLS",
            ),
            (
                "[[upstream]]\nname = \"r\"\nkind = \"smtp\"\nhost = \"x\"\npassword = \"inline\"\n",
                7,
                "unknown field",
            ),
            (
                "[[upstream]]\nname = \"r\"\nkind = \"pigeon\"\n",
                5,
                "unknown variant",
            ),
        ];
        for (tail, want_line, want_message) in cases {
            let text = format!("{base}{tail}");
            let (line, _column, message) = error_of(&text);
            assert!(message.contains(want_message), "{text:?}: {message}");
            assert_eq!(line, *want_line, "{text:?}: {message}");
        }
    }

    /// The reference in README.md must stay a valid configuration.
    #[test]
    fn readme_configuration_reference_is_valid() {
        let readme = include_str!("../../../README.md");
        let section = &readme[readme.find("## Configuration reference").expect("section")..];
        let start = section.find("```toml").expect("toml block") + "```toml".len();
        let block = &section[start..start + section[start..].find("```").expect("block end")];
        let config = Config::parse(block, "README.md").unwrap();
        assert_eq!(
            config.upstream("relay").unwrap().tls_mode(),
            TlsMode::Required
        );
        assert_eq!(config.routes.len(), 1);
        assert_eq!(
            config.auth.users_file.as_deref(),
            Some(Path::new("/etc/tsubame/users.toml"))
        );
        let scanner = config.users.find("scanner-2f").unwrap();
        assert_eq!(scanner.upstream.as_deref(), Some("relay"));
        assert!(scanner.sender_allowed("anyone@sub.example.com"));
        assert!(!scanner.sender_allowed("scanner@example.net"));
        assert!(scanner.recipient_allowed("someone@example.com"));
        let listener = &config.listeners[0];
        assert_eq!(listener.mode, ListenerMode::Smtp);
        assert!(listener.has_tls() && listener.tls_required_for_auth());
        assert_eq!(config.rate_limits.per_user.messages_per_hour, Some(500));
        assert_eq!(config.rate_limits.per_client.messages_per_minute, Some(60));
        assert_eq!(config.login_guard, LoginGuardConfig::default());
    }

    const GMAIL: &str = "[[listener]]\naddress = \"127.0.0.1:25\"\n\
        [[oauth]]\nname = \"google\"\nkind = \"refresh-token\"\nclient_id = \"id.apps.googleusercontent.com\"\n\
        client_secret_env = \"GOOGLE_CLIENT_SECRET\"\ntoken_directory = \"/var/lib/tsubame/oauth\"\n\
        [[upstream]]\nname = \"gmail\"\nkind = \"gmail\"\noauth = \"google\"\naccount = \"relay@example.com\"\n\
        fallback = \"mx\"\nmessages_per_day = 2000\n\
        [[upstream.account_map]]\nuser = \"scanner-3f\"\naccount = \"scans@example.com\"\n\
        [[upstream.account_map]]\nsender = \"@billing.example.com\"\naccount = \"billing@example.com\"\n\
        [delivery]\ndefault_upstream = \"gmail\"\n";

    #[test]
    fn gmail_preset_and_account_mapping() {
        let config = Config::parse(GMAIL, "t.toml").unwrap();
        let gmail = config.upstream("gmail").unwrap();
        assert_eq!(gmail.host(), Some("smtp.gmail.com"));
        assert_eq!(gmail.port_number(), 587);
        assert_eq!(gmail.tls_mode(), TlsMode::Required);
        assert_eq!(gmail.auth_method(), Some(AuthMethod::Xoauth2));
        assert_eq!(
            gmail.account_for(Some("scanner-3f"), "x@example.org"),
            Some("scans@example.com")
        );
        assert_eq!(
            gmail.account_for(None, "a@billing.example.com"),
            Some("billing@example.com")
        );
        assert_eq!(
            gmail.account_for(Some("printer"), "a@example.org"),
            Some("relay@example.com")
        );
        let source = &config.oauth_sources[0];
        assert_eq!(source.token_endpoint, oauth::GOOGLE_TOKEN_ENDPOINT);
        assert_eq!(source.scope, "https://mail.google.com/");
        assert_eq!(
            source.refresh_token_file("scans@example.com").unwrap(),
            Path::new("/var/lib/tsubame/oauth/scans@example.com.token")
        );
        assert_eq!(
            oauth::token_file_in(Path::new("/d"), "../evil/x"),
            Path::new("/d/_.._evil_x.token")
        );
        let summary = config.summary();
        assert!(summary.contains("upstream gmail (default): smtp.gmail.com:587, TLS Required, AUTH XOAUTH2 with tokens from oauth \"google\" as scans@example.com for user scanner-3f; billing@example.com for sender @billing.example.com; relay@example.com otherwise, at most 2000 messages per account per 24 h, fallback mx"), "{summary}");
    }

    #[test]
    fn oauth_and_preset_mistakes_are_refused_with_their_line() {
        let cases = [
            (
                GMAIL.replace("oauth = \"google\"\n", ""),
                "needs oauth = the name of an [[oauth]] token source",
            ),
            (
                GMAIL.replace("oauth = \"google\"", "oauth = \"gogle\""),
                "oauth names \"gogle\", which is not an [[oauth]] source",
            ),
            (
                GMAIL.replace("kind = \"gmail\"", "kind = \"gmail\"\nauth = \"password\""),
                "oauth is for auth = \"xoauth2\" or \"oauthbearer\"",
            ),
            (
                GMAIL.replace("fallback = \"mx\"", "fallback = \"gmail\""),
                "fallback names \"gmail\", which is not another [[upstream]]",
            ),
            (
                GMAIL.replace("client_secret_env = \"GOOGLE_CLIENT_SECRET\"\n", ""),
                "give client_secret_file or client_secret_env",
            ),
            (
                GMAIL.replace("token_directory = \"/var/lib/tsubame/oauth\"\n", ""),
                "refresh-token needs token_directory",
            ),
            (
                GMAIL.replace("messages_per_day = 2000", "messages_per_day = 0"),
                "a daily quota of 0 sends nothing",
            ),
            (
                GMAIL.replace("user = \"scanner-3f\"\n", ""),
                "account_map entry 1 names neither user nor sender",
            ),
            (
                GMAIL.replace("https", "http").replace(
                    "[[oauth]]",
                    "[[oauth]]\ntoken_endpoint = \"http://oauth.example\"",
                ),
                "must be an https:// URL",
            ),
        ];
        for (text, message) in cases {
            let error = Config::parse(&text, "t.toml").unwrap_err().to_string();
            assert!(error.contains(message), "{message}: {error}");
        }
    }

    #[test]
    fn gmail_takes_an_app_password_too() {
        let text = "[[listener]]\naddress = \"127.0.0.1:25\"\n[[upstream]]\nname = \"gmail\"\nkind = \"gmail\"\n\
            username = \"printer@example.com\"\npassword_env = \"GMAIL_APP_PASSWORD\"\n";
        let config = Config::parse(text, "t.toml").unwrap();
        let gmail = config.upstream("gmail").unwrap();
        assert_eq!(gmail.auth_method(), Some(AuthMethod::Password));
        assert_eq!(gmail.host(), Some(GMAIL_HOST));
        let bare = "[[listener]]\naddress = \"127.0.0.1:25\"\n[[upstream]]\nname = \"gmail\"\nkind = \"gmail\"\nauth = \"password\"\n";
        let error = Config::parse(bare, "t.toml").unwrap_err().to_string();
        assert!(
            error.contains("auth = \"password\" needs a username"),
            "{error}"
        );
    }

    #[test]
    fn google_relay_needs_a_fully_qualified_ehlo_name() {
        let base = "[[listener]]\naddress = \"127.0.0.1:25\"\n[[upstream]]\nname = \"workspace\"\nkind = \"google-relay\"\n";
        let error = Config::parse(base, "t.toml").unwrap_err().to_string();
        assert!(
            error.contains("not a fully qualified domain name"),
            "{error}"
        );
        assert!(error.starts_with("t.toml:3:"), "{error}");
        for bad in [
            "localhost",
            "printer",
            "192.0.2.1",
            "relay.example.123",
            "-a.example.com",
        ] {
            let text = format!("{base}ehlo_name = \"{bad}\"\n");
            let error = Config::parse(&text, "t.toml").unwrap_err().to_string();
            assert!(
                error.contains(&format!("(not \"{bad}\")")),
                "{bad}: {error}"
            );
        }
        let text = format!("[server]\nhostname = \"relay.example.com\"\n{base}");
        let config = Config::parse(&text, "t.toml").unwrap();
        let relay = config.upstream("workspace").unwrap();
        assert_eq!(relay.host(), Some("smtp-relay.gmail.com"));
        assert_eq!(
            (relay.port_number(), relay.tls_mode(), relay.auth_method()),
            (587, TlsMode::Required, None)
        );
    }

    #[test]
    fn readme_device_login_example_is_valid() {
        let readme = include_str!("../../../README.md");
        let section = &readme[readme.find("### Device login").expect("section")..];
        let start = section.find("```toml").expect("toml block") + "```toml".len();
        let block = &section[start..start + section[start..].find("```").expect("block end")];
        let config = Config::parse(block, "README.md").unwrap();
        let [secure, legacy] = &config.listeners[..] else {
            panic!("two listeners");
        };
        assert!(secure.require_auth && secure.tls_required_for_auth());
        assert!(legacy.require_auth && !legacy.tls_required_for_auth());
        assert_eq!(legacy.relaxations().len(), 2);
        assert!(config.summary().contains("relaxed: AUTH without TLS"));
    }

    /// The `toml` blocks of the README section that starts with `heading`, up to the
    /// next heading of level 2 or 3.
    fn readme_toml_blocks(heading: &str) -> Vec<&'static str> {
        let readme = include_str!("../../../README.md");
        let start = readme.find(heading).expect("section");
        let body = &readme[start + heading.len()..];
        let end = ["\n## ", "\n### "]
            .iter()
            .filter_map(|next| body.find(next))
            .min()
            .unwrap_or(body.len());
        body[..end]
            .split("```toml\n")
            .skip(1)
            .map(|rest| &rest[..rest.find("```").expect("block end")])
            .collect()
    }

    /// The README's Google example: presets, accounts, quotas and the relay's FQDN.
    #[test]
    fn readme_google_example_is_valid() {
        let blocks = readme_toml_blocks("## Google OAuth2 set-up");
        assert_eq!(blocks.len(), 1, "one toml block in the Google section");
        let text = format!(
            "[[listener]]\naddress = \"127.0.0.1:25\"\n{}\n[[upstream]]\nname = \"relay\"\nkind = \"smtp\"\nhost = \"relay.example.net\"\n",
            blocks[0]
        );
        let config = Config::parse(&text, "README.md").unwrap();
        let gmail = config.upstream("gmail").unwrap();
        assert_eq!(gmail.host(), Some(GMAIL_HOST));
        assert_eq!(gmail.auth_method(), Some(AuthMethod::Xoauth2));
        assert_eq!(
            gmail.account_for(Some("scanner-3f"), "x@example.com"),
            Some("scans@example.com")
        );
        assert_eq!(
            gmail.account_for(None, "ar@billing.example.com"),
            Some("billing@example.com")
        );
        assert_eq!(
            gmail.account_for(None, "x@example.com"),
            Some("printer@example.com")
        );
        assert_eq!(
            (gmail.messages_per_day, gmail.quota_reserve_percent),
            (Some(2000), 5)
        );
        let workspace = config.upstream("workspace").unwrap();
        assert_eq!(workspace.host(), Some(GOOGLE_RELAY_HOST));
        assert_eq!(config.oauth_sources[0].kind, OAuthKind::RefreshToken);
    }

    /// Where a relay-service example takes its password from.
    enum PasswordSource {
        Env(&'static str),
        File(&'static str),
    }

    /// Every block of the README's "Relay services" keeps the settings its service
    /// documents (the pages named in each block's first lines), takes the password from
    /// outside the file, and has mail routed to it. Blocks are fragments: the listener
    /// is prepended here, as a real configuration has its own.
    #[test]
    fn readme_relay_service_examples_keep_the_documented_settings() {
        struct Documented {
            upstream: &'static str,
            host: &'static str,
            port: u16,
            tls: TlsMode,
            username: &'static str,
            password: PasswordSource,
            /// `None`: the block makes it the default upstream.
            sender_domain: Option<&'static str>,
        }
        let services = [
            Documented {
                upstream: "sendgrid",
                host: "smtp.sendgrid.net",
                port: 587,
                tls: TlsMode::Required,
                username: "apikey",
                password: PasswordSource::Env("SENDGRID_API_KEY"),
                sender_domain: None,
            },
            Documented {
                upstream: "ses-tokyo",
                host: "email-smtp.ap-northeast-1.amazonaws.com",
                port: 465,
                tls: TlsMode::Implicit,
                username: "AKIAIOSFODNN7EXAMPLE",
                password: PasswordSource::File("/etc/tsubame/ses-smtp-password"),
                sender_domain: Some("example.jp"),
            },
            Documented {
                upstream: "mailgun",
                host: "smtp.mailgun.org",
                port: 2525,
                tls: TlsMode::Required,
                username: "postmaster@mg.example.com",
                password: PasswordSource::File("/etc/tsubame/mailgun-smtp-password"),
                sender_domain: Some("mg.example.com"),
            },
            Documented {
                upstream: "postmark",
                host: "smtp.postmarkapp.com",
                port: 587,
                tls: TlsMode::Required,
                username: "postmark-smtp-token-access-key",
                password: PasswordSource::Env("POSTMARK_SMTP_SECRET_KEY"),
                sender_domain: Some("example.org"),
            },
        ];
        let blocks = readme_toml_blocks("### Relay services");
        assert_eq!(
            blocks.len(),
            services.len(),
            "one README block per service in this table"
        );
        for (block, service) in blocks.into_iter().zip(services) {
            let name = service.upstream;
            assert!(
                block
                    .lines()
                    .next()
                    .is_some_and(|line| line.contains(" https://")),
                "{name}: the block starts with a comment naming its documentation"
            );
            let text = format!("[[listener]]\naddress = \"127.0.0.1:25\"\n{block}");
            let config =
                Config::parse(&text, "README.md").unwrap_or_else(|error| panic!("{name}: {error}"));
            let [upstream] = &config.upstreams[..] else {
                panic!("{name}: one upstream per block");
            };
            assert_eq!(upstream.name, name);
            assert_eq!(upstream.kind, UpstreamKind::Smtp, "{name}");
            assert_eq!(upstream.host.as_deref(), Some(service.host), "{name}");
            assert_eq!(upstream.port_number(), service.port, "{name}");
            assert_eq!(upstream.tls_mode(), service.tls, "{name}");
            assert_eq!(upstream.ca_file, None, "{name}: public roots, no ca_file");
            assert_eq!(
                upstream.username.as_deref(),
                Some(service.username),
                "{name}"
            );
            let expected_password = match service.password {
                PasswordSource::Env(variable) => (Some(variable), None),
                PasswordSource::File(path) => (None, Some(path)),
            };
            assert_eq!(
                (
                    upstream.password_env.as_deref(),
                    upstream.password_file.as_deref().and_then(Path::to_str)
                ),
                expected_password,
                "{name}: the password comes from outside the file"
            );
            match service.sender_domain {
                None => assert_eq!(config.delivery.default_upstream, name),
                Some(domain) => {
                    let route = config
                        .routes
                        .iter()
                        .find(|route| route.upstream == name)
                        .unwrap_or_else(|| panic!("{name}: no route names it"));
                    assert_eq!(route.sender_domains, [domain], "{name}");
                }
            }
        }
    }

    #[test]
    fn listener_tls_and_auth_settings_are_checked() {
        let cases = [
            (
                "mode = \"smtps\"\n",
                "mode \"smtps\" (implicit TLS) needs certificate_file and key_file",
                3,
            ),
            (
                "certificate_file = \"c.pem\"\n",
                "certificate_file needs key_file",
                1,
            ),
            (
                "key_file = \"k.pem\"\n",
                "key_file needs certificate_file",
                1,
            ),
            (
                "require_auth = true\n",
                "require_auth with require_tls_for_auth (the default) needs a certificate",
                3,
            ),
            ("profile = \"legacy\"\n", "unknown variant `legacy`", 3),
        ];
        for (keys, message, line) in cases {
            let text = format!("[[listener]]\naddress = \"127.0.0.1:25\"\n{keys}");
            let error = Config::parse(&text, "t.toml").unwrap_err().to_string();
            assert!(error.contains(message), "{keys}: {error}");
            assert!(
                error.starts_with(&format!("t.toml:{line}:")),
                "{keys}: {error}"
            );
        }
        // A LAN listener may require AUTH without TLS when it says so.
        Config::parse(
            "[[listener]]\naddress = \"127.0.0.1:25\"\nrequire_auth = true\nrequire_tls_for_auth = false\n",
            "t.toml",
        )
        .unwrap();
        let error = Config::parse(
            "[[listener]]\naddress = \"127.0.0.1:25\"\n[rate_limits.per_user]\nmessages_per_hour = 0\n",
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("a limit of 0 refuses everything"), "{error}");
        let error = Config::parse(
            "[[listener]]\naddress = \"127.0.0.1:25\"\n[login_guard]\nlockout_secs = 0\n",
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("lockout_secs must be between"), "{error}");
    }

    #[test]
    fn duplicate_listener_refused() {
        let (_, _, message) = error_of(
            "[[listener]]\naddress = \"127.0.0.1:25\"\n[[listener]]\naddress = \"127.0.0.1:25\"\n",
        );
        assert!(message.contains("configured twice"), "{message}");
    }
}
