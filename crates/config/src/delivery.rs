//! Where accepted mail goes: upstreams, routes, and the `--upstream URL` shorthand.
//!
//! An upstream is either a relay we log in to (`kind = "smtp"`) or direct delivery to
//! the recipient domain's MX (`kind = "mx"`). Routes are tried in order; the first whose
//! every given condition matches names the upstream, and `[delivery] default_upstream`
//! takes the rest. Without any of this, mail goes out by MX.

use std::path::PathBuf;

use ipnet::IpNet;
use serde::Deserialize;

/// The name of the direct-delivery upstream that exists even when none is configured.
pub const BUILTIN_MX_UPSTREAM: &str = "mx";

/// Gmail's submission server (`kind = "gmail"`).
pub const GMAIL_HOST: &str = "smtp.gmail.com";

/// Google Workspace's SMTP relay service (`kind = "google-relay"`).
pub const GOOGLE_RELAY_HOST: &str = "smtp-relay.gmail.com";

/// A secret (password) that never shows in `Debug` output, logs or error messages.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Name we give in EHLO to upstreams. Default: `server.hostname`, else the host name.
    #[serde(default)]
    pub ehlo_name: Option<String>,
    /// Upstream for mail that no route matches.
    #[serde(default = "default_upstream_name")]
    pub default_upstream: String,
    /// A message still undelivered after this long is bounced (RFC 5321 §4.5.4.1 suggests
    /// 4–5 days).
    #[serde(default = "default_max_age_secs")]
    pub max_age_secs: u64,
    /// The delay before the first retry of a deferred recipient; each later delay is
    /// `retry_factor` times the one before, up to `retry_max_secs`.
    #[serde(default = "default_retry_initial_secs")]
    pub retry_initial_secs: u64,
    #[serde(default = "default_retry_factor")]
    pub retry_factor: f64,
    #[serde(default = "default_retry_max_secs")]
    pub retry_max_secs: u64,
    /// An explicit schedule instead: the delay after attempt n is entry n (seconds); the
    /// last entry repeats.
    #[serde(default)]
    pub retry_schedule_secs: Option<Vec<u64>>,
    /// On SIGTERM, how long deliveries in progress may take to finish before tsubame
    /// exits anyway (what they had not finished is tried again at the next start).
    #[serde(default = "default_shutdown_timeout_secs")]
    pub shutdown_timeout_secs: u64,
    /// Threads that sign messages with DKIM; 0 means one per CPU.
    #[serde(default)]
    pub signing_threads: usize,
}

/// Postfix's `minimal_backoff_time` is 300 s, `maximal_backoff_time` 4000 s; RFC 5321
/// §4.5.4.1 asks for at least 30 minutes between retries of one destination, which the
/// doubling reaches by the third retry.
fn default_retry_initial_secs() -> u64 {
    300
}

fn default_retry_factor() -> f64 {
    2.0
}

fn default_retry_max_secs() -> u64 {
    3600
}

/// Enough for a transaction in progress to finish on a healthy upstream; short enough
/// that a service manager's stop timeout (systemd's default is 90 s) is not reached.
fn default_shutdown_timeout_secs() -> u64 {
    30
}

fn default_upstream_name() -> String {
    BUILTIN_MX_UPSTREAM.to_string()
}

fn default_max_age_secs() -> u64 {
    5 * 24 * 3600
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            ehlo_name: None,
            default_upstream: default_upstream_name(),
            max_age_secs: default_max_age_secs(),
            retry_initial_secs: default_retry_initial_secs(),
            retry_factor: default_retry_factor(),
            retry_max_secs: default_retry_max_secs(),
            retry_schedule_secs: None,
            shutdown_timeout_secs: default_shutdown_timeout_secs(),
            signing_threads: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamKind {
    /// A relay (smarthost) at `host:port`.
    Smtp,
    /// Direct delivery: MX lookup of each recipient domain (RFC 5321 §5.1).
    Mx,
    /// A relay preset: smtp.gmail.com:587, STARTTLS required, AUTH XOAUTH2 with an
    /// `[[oauth]]` token source (Google no longer takes passwords there).
    Gmail,
    /// A relay preset: Google Workspace's SMTP relay, smtp-relay.gmail.com:587,
    /// STARTTLS required, AUTH optional (the relay may admit by IP address instead); the
    /// EHLO name must be a real fully qualified domain name.
    GoogleRelay,
}

impl UpstreamKind {
    /// A relay at a host (`smtp` and the Google presets), as opposed to `mx`.
    pub fn is_relay(self) -> bool {
        self != UpstreamKind::Mx
    }
}

/// How tsubame logs in to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    /// AUTH PLAIN, else LOGIN, with `username` and a password.
    Password,
    /// Google's SASL XOAUTH2 with an access token from the `oauth` source.
    Xoauth2,
    /// RFC 7628 OAUTHBEARER with an access token from the `oauth` source.
    Oauthbearer,
}

impl std::fmt::Display for AuthMethod {
    /// The SASL mechanism's registered name (RFC 4422 §3.1), as upstreams advertise it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthMethod::Password => "PLAIN or LOGIN",
            AuthMethod::Xoauth2 => "XOAUTH2",
            AuthMethod::Oauthbearer => "OAUTHBEARER",
        })
    }
}

/// Which account an upstream session logs in as, for one logged-in device or envelope
/// sender. `[[upstream.account_map]]` entries are tried in order; the first whose given
/// conditions all match names the account; else the upstream's `account`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountMapping {
    /// A logged-in device account (`[[user]]` name).
    #[serde(default)]
    pub user: Option<String>,
    /// The envelope sender: an address, `@domain` or `.domain` (as `allowed_senders`).
    #[serde(default)]
    pub sender: Option<crate::SenderPattern>,
    /// The upstream account (for Google: the mailbox address the token is for).
    pub account: String,
}

/// How an upstream connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// TLS from the first byte (RFC 8314), port 465.
    Implicit,
    /// STARTTLS, and no mail goes out if it is not offered or fails.
    Required,
    /// STARTTLS when offered, plain text otherwise.
    Opportunistic,
    /// Plain text; credentials are never sent over it.
    None,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    pub kind: UpstreamKind,
    /// Required for `smtp`, refused for `mx`.
    #[serde(default)]
    pub host: Option<String>,
    /// Default: 465 for implicit TLS, 587 otherwise (`smtp`); 25 (`mx`).
    #[serde(default)]
    pub port: Option<u16>,
    /// Default: `required` for `smtp` (a named relay must not be spoken to in clear),
    /// `opportunistic` for `mx` (most MX hosts offer STARTTLS, some do not).
    #[serde(default)]
    pub tls: Option<TlsMode>,
    /// PEM file of the CA that signs a private relay's certificate, instead of the
    /// public web PKI roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password (its first line). Keep it mode 0600.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Only from `--upstream smtp://user:pass@host`; never read from the config file.
    #[serde(skip)]
    pub password_inline: Option<Secret>,
    /// Connections open to this upstream at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Messages sent over one connection before it is closed and a new one opened.
    #[serde(default = "default_max_messages_per_connection")]
    pub max_messages_per_connection: usize,
    /// An unused connection is closed after this long.
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// `mx` only: the DNS server to ask (host:port), instead of the system's resolvers.
    #[serde(default)]
    pub nameserver: Option<std::net::SocketAddr>,
    /// Caps every wait on this upstream (connect, each reply, each write). Default: the
    /// RFC 5321 §4.5.3.2 values (up to 10 minutes for the reply after the content).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Most transactions started per second on this upstream; unlimited when absent.
    #[serde(default)]
    pub rate_per_second: Option<f64>,
    /// Recipients sent in one transaction; a message with more is sent in several.
    #[serde(default = "default_max_recipients_per_transaction")]
    pub max_recipients_per_transaction: usize,
    /// The name we say in EHLO to this upstream; default `[delivery] ehlo_name`.
    #[serde(default)]
    pub ehlo_name: Option<String>,
    /// How to log in. Default: `xoauth2` for `gmail`, `password` when a username is
    /// set, else no AUTH.
    #[serde(default)]
    pub auth: Option<AuthMethod>,
    /// The `[[oauth]]` token source for `xoauth2` and `oauthbearer`.
    #[serde(default)]
    pub oauth: Option<String>,
    /// The account sessions log in as when no `account_map` entry matches (the token's
    /// account for OAuth; `username` plays this part for passwords).
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default)]
    pub account_map: Vec<AccountMapping>,
    /// Another upstream that takes the mail this one cannot: an account at its quota,
    /// or the upstream answering with its rate-limit replies.
    #[serde(default)]
    pub fallback: Option<String>,
    /// Messages per account per rolling 24 hours (Google: 10,000 for the Workspace relay,
    /// fewer for Gmail accounts). Unlimited when absent.
    #[serde(default)]
    pub messages_per_day: Option<u32>,
    /// Recipients per account per rolling 24 hours (Google: 10,000 for the relay).
    #[serde(default)]
    pub recipients_per_day: Option<u32>,
    /// Percentage of each daily quota kept back, so mail spills to `fallback` (or waits)
    /// before the upstream itself refuses. 0 to 50.
    #[serde(default)]
    pub quota_reserve_percent: u8,
}

/// Postfix's `smtp_destination_recipient_limit` default; RFC 5321 §4.5.3.1.8 requires
/// servers to take at least 100, so 50 is safe everywhere.
fn default_max_recipients_per_transaction() -> usize {
    50
}

/// Enough parallel connections to keep a relay busy; relay services typically allow
/// 10–50 per account.
fn default_max_connections() -> usize {
    20
}

/// Reuse a connection for many messages (RSET between), but not forever, so that a
/// relay's per-session limits and DNS changes are picked up.
fn default_max_messages_per_connection() -> usize {
    100
}

/// Many relays close idle sessions after 30–60 s (RFC 5321 §4.5.3.2.7 gives servers 5
/// minutes); closing first avoids sending into a half-closed connection.
fn default_idle_timeout_secs() -> u64 {
    30
}

impl UpstreamConfig {
    /// A direct-delivery upstream with defaults.
    pub fn mx(name: &str) -> Self {
        Self {
            name: name.to_string(),
            kind: UpstreamKind::Mx,
            host: None,
            port: None,
            tls: None,
            ca_file: None,
            username: None,
            password_file: None,
            password_env: None,
            password_inline: None,
            max_connections: default_max_connections(),
            max_messages_per_connection: default_max_messages_per_connection(),
            idle_timeout_secs: default_idle_timeout_secs(),
            nameserver: None,
            timeout_secs: None,
            rate_per_second: None,
            max_recipients_per_transaction: default_max_recipients_per_transaction(),
            ehlo_name: None,
            auth: None,
            oauth: None,
            account: None,
            account_map: Vec::new(),
            fallback: None,
            messages_per_day: None,
            recipients_per_day: None,
            quota_reserve_percent: 0,
        }
    }

    pub fn tls_mode(&self) -> TlsMode {
        self.tls.unwrap_or(match self.kind {
            UpstreamKind::Smtp | UpstreamKind::Gmail | UpstreamKind::GoogleRelay => {
                TlsMode::Required
            }
            UpstreamKind::Mx => TlsMode::Opportunistic,
        })
    }

    pub fn port_number(&self) -> u16 {
        self.port.unwrap_or(match (self.kind, self.tls_mode()) {
            (UpstreamKind::Mx, _) => 25,
            (_, TlsMode::Implicit) => 465,
            (_, _) => 587,
        })
    }

    /// The relay's host: as configured, or the preset's.
    pub fn host(&self) -> Option<&str> {
        self.host.as_deref().or(match self.kind {
            UpstreamKind::Gmail => Some(GMAIL_HOST),
            UpstreamKind::GoogleRelay => Some(GOOGLE_RELAY_HOST),
            UpstreamKind::Smtp | UpstreamKind::Mx => None,
        })
    }

    /// How sessions log in, after the defaults; `None`: no AUTH. Gmail's default is
    /// XOAUTH2 unless a password is configured (an app password).
    pub fn auth_method(&self) -> Option<AuthMethod> {
        let password = self.password_file.is_some()
            || self.password_env.is_some()
            || self.password_inline.is_some();
        self.auth.or(match self.kind {
            UpstreamKind::Gmail if !password => Some(AuthMethod::Xoauth2),
            _ if self.username.is_some() => Some(AuthMethod::Password),
            _ => None,
        })
    }

    /// The account whose daily quota a message counts against: the login's account,
    /// else (Google's relay, which counts per sending user) the envelope sender.
    pub fn quota_account(&self, user: Option<&str>, sender: &str) -> String {
        match self.account_for(user, sender) {
            Some(account) if self.uses_oauth() || self.username.is_some() => account.to_string(),
            _ => sender.to_ascii_lowercase(),
        }
    }

    /// Whether logins use tokens from an `[[oauth]]` source.
    pub fn uses_oauth(&self) -> bool {
        matches!(
            self.auth_method(),
            Some(AuthMethod::Xoauth2 | AuthMethod::Oauthbearer)
        )
    }

    /// The account to log in as for a message from `sender` (the envelope sender)
    /// submitted by `user` (a logged-in device), or `None` when nothing names one.
    pub fn account_for(&self, user: Option<&str>, sender: &str) -> Option<&str> {
        self.account_map
            .iter()
            .find(|mapping| {
                mapping
                    .user
                    .as_deref()
                    .is_none_or(|wanted| user == Some(wanted))
                    && mapping
                        .sender
                        .as_ref()
                        .is_none_or(|pattern| pattern.matches(sender))
            })
            .map(|mapping| mapping.account.as_str())
            .or(self.account.as_deref())
            .or(self.username.as_deref())
    }

    /// Checks the combination of keys; returns the key at fault and a message.
    pub(crate) fn validate(&self) -> Result<(), (&'static str, String)> {
        let name = &self.name;
        if name.is_empty() {
            return Err(("name", "an upstream needs a name".to_string()));
        }
        if self.host.as_deref().is_some_and(str::is_empty) {
            return Err(("host", format!("upstream {name:?}: host is empty")));
        }
        match self.kind {
            UpstreamKind::Smtp if self.host.is_none() => {
                return Err((
                    "host",
                    format!("upstream {name:?} (kind smtp) needs a host"),
                ));
            }
            UpstreamKind::Mx if self.host.is_some() => {
                return Err((
                    "host",
                    format!("upstream {name:?} is kind mx: its hosts come from DNS, remove host"),
                ));
            }
            kind if kind.is_relay() && self.nameserver.is_some() => {
                return Err((
                    "nameserver",
                    format!("upstream {name:?}: nameserver is for kind mx only"),
                ));
            }
            _ => {}
        }
        self.validate_login()?;
        let password_sources = [
            self.password_file.is_some(),
            self.password_env.is_some(),
            self.password_inline.is_some(),
        ]
        .into_iter()
        .filter(|given| *given)
        .count();
        if password_sources > 1 {
            return Err((
                "password_file",
                format!("upstream {name:?}: give password_file or password_env, not both"),
            ));
        }
        if password_sources == 1 && self.username.is_none() {
            return Err((
                "username",
                format!("upstream {name:?}: a password needs a username"),
            ));
        }
        if (self.username.is_some() || self.uses_oauth()) && self.tls_mode() == TlsMode::None {
            return Err((
                "tls",
                format!(
                    "upstream {name:?}: credentials are never sent without TLS; set tls to required or implicit"
                ),
            ));
        }
        for (key, value) in [
            ("max_connections", self.max_connections as u64),
            (
                "max_messages_per_connection",
                self.max_messages_per_connection as u64,
            ),
            ("idle_timeout_secs", self.idle_timeout_secs),
            ("timeout_secs", self.timeout_secs.unwrap_or(1)),
            (
                "max_recipients_per_transaction",
                self.max_recipients_per_transaction as u64,
            ),
        ] {
            if value == 0 {
                return Err((
                    key,
                    format!("upstream {name:?}: {key} must be greater than 0"),
                ));
            }
        }
        if let Some(rate) = self.rate_per_second
            && (!rate.is_finite() || rate <= 0.0)
        {
            return Err((
                "rate_per_second",
                format!("upstream {name:?}: rate_per_second must be a positive number"),
            ));
        }
        Ok(())
    }

    /// Checks `auth`, `oauth`, `account` and `account_map` together.
    fn validate_login(&self) -> Result<(), (&'static str, String)> {
        let name = &self.name;
        let method = self.auth_method();
        if self.kind == UpstreamKind::Mx && method.is_some() {
            return Err((
                "auth",
                format!("upstream {name:?} is kind mx: MX hosts take no AUTH"),
            ));
        }
        if self.kind == UpstreamKind::Gmail && method.is_none() {
            return Err((
                "auth",
                format!(
                    "upstream {name:?} is kind gmail: smtp.gmail.com needs a login: OAuth2 (the default, with oauth and account) or an app password (auth = \"password\" with username and password_file)"
                ),
            ));
        }
        if self.uses_oauth() {
            if self.oauth.is_none() {
                return Err((
                    "oauth",
                    format!(
                        "upstream {name:?}: {method:?} needs oauth = the name of an [[oauth]] token source"
                    ),
                ));
            }
            if self.account.is_none() && self.account_map.is_empty() && self.username.is_none() {
                return Err((
                    "account",
                    format!(
                        "upstream {name:?}: OAuth needs account (the mailbox the token is for) or account_map entries"
                    ),
                ));
            }
            if self.password_file.is_some() || self.password_env.is_some() {
                return Err((
                    "password_file",
                    format!("upstream {name:?}: OAuth logins take no password"),
                ));
            }
        } else {
            if self.oauth.is_some() {
                return Err((
                    "oauth",
                    format!(
                        "upstream {name:?}: oauth is for auth = \"xoauth2\" or \"oauthbearer\""
                    ),
                ));
            }
            if method == Some(AuthMethod::Password) && self.username.is_none() {
                return Err((
                    "username",
                    format!("upstream {name:?}: auth = \"password\" needs a username"),
                ));
            }
            if !self.account_map.is_empty() {
                return Err((
                    "account_map",
                    format!(
                        "upstream {name:?}: account_map is for OAuth logins; a password login has one username"
                    ),
                ));
            }
        }
        for (index, mapping) in self.account_map.iter().enumerate() {
            if mapping.user.is_none() && mapping.sender.is_none() {
                return Err((
                    "account_map",
                    format!(
                        "upstream {name:?}: account_map entry {} names neither user nor sender; use account for the default",
                        index + 1
                    ),
                ));
            }
        }
        if self.quota_reserve_percent > 50 {
            return Err((
                "quota_reserve_percent",
                format!("upstream {name:?}: quota_reserve_percent must be between 0 and 50"),
            ));
        }
        if matches!(self.messages_per_day, Some(0)) || matches!(self.recipients_per_day, Some(0)) {
            return Err((
                "messages_per_day",
                format!(
                    "upstream {name:?}: a daily quota of 0 sends nothing; leave it out for no quota"
                ),
            ));
        }
        Ok(())
    }

    /// The password from wherever the configuration says it is, or `None` when no
    /// password is configured. Errors name the file or variable, never the value.
    pub fn password(&self) -> Result<Option<Secret>, String> {
        if let Some(password) = &self.password_inline {
            return Ok(Some(password.clone()));
        }
        read_secret(
            &format!("upstream {:?}", self.name),
            self.password_file.as_deref(),
            self.password_env.as_deref(),
        )
    }
}

/// A secret from a file (its first line) or an environment variable, for `what` (named
/// in errors, which never hold the value).
pub(crate) fn read_secret(
    what: &str,
    file: Option<&std::path::Path>,
    variable: Option<&str>,
) -> Result<Option<Secret>, String> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("{what}: cannot read {}: {error}", path.display()))?;
        let first_line = text.lines().next().unwrap_or("");
        if first_line.is_empty() {
            return Err(format!("{what}: {} is empty", path.display()));
        }
        return Ok(Some(Secret::new(first_line.to_string())));
    }
    if let Some(variable) = variable {
        return match std::env::var(variable) {
            Ok(value) if !value.is_empty() => Ok(Some(Secret::new(value))),
            _ => Err(format!(
                "{what}: environment variable {variable} is not set"
            )),
        };
    }
    Ok(None)
}

/// One route: every condition given must match (an absent condition matches all).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Domains of the envelope sender (exact, case-insensitive; `.example.com` also
    /// matches its subdomains).
    #[serde(default)]
    pub sender_domains: Vec<String>,
    /// Domains of the recipient, as above. A message whose recipients match different
    /// routes is delivered per route.
    #[serde(default)]
    pub recipient_domains: Vec<String>,
    /// Authenticated users (device login, a later release).
    #[serde(default)]
    pub users: Vec<String>,
    /// Networks of the client that submitted the message.
    #[serde(default)]
    pub client_networks: Vec<IpNet>,
    /// The upstream's name.
    pub upstream: String,
    /// Sign this route's mail with DKIM (when a `[[dkim]]` entry covers it). Default on.
    #[serde(default = "default_true")]
    pub dkim: bool,
    /// Sign with this `[[dkim]]` domain's keys instead of the one the From header's
    /// domain selects.
    #[serde(default)]
    pub dkim_domain: Option<String>,
    /// A `List-Unsubscribe` value (`<mailto:...>, <https://...>`, RFC 2369) added to
    /// messages that have none, before signing.
    #[serde(default)]
    pub list_unsubscribe: Option<String>,
    /// Also add `List-Unsubscribe-Post: List-Unsubscribe=One-Click` (RFC 8058): the
    /// one-click unsubscribe that Gmail and Yahoo ask of bulk senders.
    #[serde(default)]
    pub list_unsubscribe_post: bool,
}

fn default_true() -> bool {
    true
}

/// Does `domain` match a route's domain pattern?
pub fn domain_matches(pattern: &str, domain: &str) -> bool {
    match pattern.strip_prefix('.') {
        Some(parent) => {
            domain.len() > parent.len()
                && domain
                    .get(domain.len() - parent.len()..)
                    .is_some_and(|tail| tail.eq_ignore_ascii_case(parent))
                && domain.as_bytes().get(domain.len() - parent.len() - 1) == Some(&b'.')
        }
        None => pattern.eq_ignore_ascii_case(domain),
    }
}

/// Parses `--upstream URL`:
/// `smtp://[user[:pass]@]host[:port]` (plain, opportunistic STARTTLS, port 25),
/// `smtp+starttls://…` (STARTTLS required, port 587), `smtps://…` (implicit TLS, port
/// 465), `mx:` (direct delivery). User and password may be percent-encoded.
pub fn parse_upstream_url(url: &str) -> Result<UpstreamConfig, String> {
    const NAME: &str = "upstream";
    let shown = redact_password(url);
    let url_for_errors = shown.as_str();
    if url == "mx:" || url == "mx" {
        return Ok(UpstreamConfig::mx(NAME));
    }
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        format!("{url_for_errors:?}: expected smtp://, smtp+starttls://, smtps:// or mx:")
    })?;
    let (tls, default_port) = match scheme.to_ascii_lowercase().as_str() {
        "smtp" => (TlsMode::Opportunistic, 25),
        "smtp+starttls" => (TlsMode::Required, 587),
        "smtps" => (TlsMode::Implicit, 465),
        other => {
            return Err(format!(
                "{url_for_errors:?}: unknown scheme {other:?} (smtp, smtp+starttls, smtps, mx)"
            ));
        }
    };
    let rest = rest.trim_end_matches('/');
    let (credentials, host_port) = match rest.rsplit_once('@') {
        Some((credentials, host_port)) => (Some(credentials), host_port),
        None => (None, rest),
    };
    let (host, port) =
        split_host_port(host_port).map_err(|error| format!("{url_for_errors:?}: {error}"))?;
    let mut upstream = UpstreamConfig::mx(NAME);
    upstream.kind = UpstreamKind::Smtp;
    upstream.host = Some(host);
    upstream.port = Some(port.unwrap_or(default_port));
    upstream.tls = Some(tls);
    if let Some(credentials) = credentials {
        let (user, password) = match credentials.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (credentials, None),
        };
        let user = percent_decode(user)
            .ok_or_else(|| format!("{url_for_errors:?}: bad percent-encoding in the user"))?;
        if user.is_empty() {
            return Err(format!("{url_for_errors:?}: empty user name"));
        }
        upstream.username = Some(user);
        if let Some(password) = password {
            let password = percent_decode(password)
                .ok_or_else(|| "bad percent-encoding in the password".to_string())?;
            upstream.password_inline = Some(Secret::new(password));
        }
    }
    upstream.validate().map_err(|(_, message)| message)?;
    Ok(upstream)
}

/// The URL with any password replaced by `***`, for error messages.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((credentials, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

fn split_host_port(text: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(bracketed) = text.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or("unclosed [ in the host")?;
        match after {
            "" => (host, None),
            _ => (
                host,
                Some(after.strip_prefix(':').ok_or("expected :port after ]")?),
            ),
        }
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    if host.is_empty() {
        return Err("no host".to_string());
    }
    let port = match port {
        Some(port) => Some(
            port.parse::<u16>()
                .map_err(|_| format!("bad port {port:?}"))?,
        ),
        None => None,
    };
    Ok((host.to_string(), port))
}

/// `%XX` decoding; `None` on a malformed escape or a result that is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while let Some(&byte) = bytes.get(index) {
        if byte == b'%' {
            let hex = text.get(index + 1..index + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            out.push(byte);
            index += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls() {
        let upstream = parse_upstream_url("smtp://127.0.0.1:2526").unwrap();
        assert_eq!(
            (
                upstream.kind,
                upstream.host.as_deref(),
                upstream.port_number(),
                upstream.tls_mode()
            ),
            (
                UpstreamKind::Smtp,
                Some("127.0.0.1"),
                2526,
                TlsMode::Opportunistic
            )
        );
        let upstream =
            parse_upstream_url("smtp+starttls://dev%40example.com:p%3Ass@smtp.example.net")
                .unwrap();
        assert_eq!(upstream.username.as_deref(), Some("dev@example.com"));
        assert_eq!(
            upstream.password_inline.as_ref().map(Secret::expose),
            Some("p:ss")
        );
        assert_eq!(
            (upstream.port_number(), upstream.tls_mode()),
            (587, TlsMode::Required)
        );
        let upstream = parse_upstream_url("smtps://[::1]:4650").unwrap();
        assert_eq!(
            (upstream.host.as_deref(), upstream.port_number()),
            (Some("::1"), 4650)
        );
        assert_eq!(upstream.tls_mode(), TlsMode::Implicit);
        assert_eq!(parse_upstream_url("mx:").unwrap().kind, UpstreamKind::Mx);
        assert_eq!(
            parse_upstream_url("smtps://relay.example")
                .unwrap()
                .port_number(),
            465
        );

        for bad in [
            "http://x",
            "smtp://",
            "smtp://host:99999",
            "smtp://:pw@host",
            "relay.example",
            "smtp://[::1",
        ] {
            assert!(parse_upstream_url(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn secrets_do_not_show_in_debug_or_errors() {
        let upstream = parse_upstream_url("smtps://user:hunter2@relay.example").unwrap();
        assert!(!format!("{upstream:?}").contains("hunter2"));
        for bad in [
            "smtp://user:hunter2@host:notaport",
            "smtp://user:hunter2@",
            "smtp://:hunter2@host",
        ] {
            let error = parse_upstream_url(bad).unwrap_err();
            assert!(!error.contains("hunter2"), "{error}");
        }
    }

    #[test]
    fn domain_patterns() {
        let cases = [
            ("example.com", "example.com", true),
            ("example.com", "EXAMPLE.com", true),
            ("example.com", "mail.example.com", false),
            (".example.com", "mail.example.com", true),
            (".example.com", "example.com", false),
            (".example.com", "badexample.com", false),
        ];
        for (pattern, domain, want) in cases {
            assert_eq!(
                domain_matches(pattern, domain),
                want,
                "{pattern} ~ {domain}"
            );
        }
    }
}
