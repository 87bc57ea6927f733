//! `[[listener]]`: where clients connect and what each listener asks of them; and the
//! `[rate_limits]` and `[login_guard]` tables that apply to every listener.

use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Deserialize;
use tsubame_policy::{LoginPolicy, RateLimits};

/// How a listener speaks TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerMode {
    /// Plain SMTP (ports 25 and 587); STARTTLS is offered when a certificate is set.
    #[default]
    Smtp,
    /// Implicit TLS from the first byte (RFC 8314, port 465); needs a certificate.
    Smtps,
}

/// A named set of relaxations for devices that cannot do better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerProfile {
    /// Old multifunction printers and scanners on a trusted LAN: AUTH without TLS and
    /// AUTH after HELO, unless the listener sets those keys itself.
    LegacyDevice,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    /// Clients inside these networks may relay without logging in. Everyone else gets
    /// `550 5.7.1` at RCPT unless they have logged in.
    #[serde(default = "default_relay_networks")]
    pub relay_networks: Vec<IpNet>,
    #[serde(default)]
    pub mode: ListenerMode,
    /// PEM certificate chain, leaf first. With `key_file`; reloaded on SIGHUP.
    #[serde(default)]
    pub certificate_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `certificate_file`. Keep it 0600.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Every client must log in before MAIL (`530 5.7.0`), even inside
    /// `relay_networks`.
    #[serde(default)]
    pub require_auth: bool,
    /// AUTH only over TLS (`538 5.7.11` otherwise). Default true; the legacy-device
    /// profile turns it off, which tsubame logs loudly at start.
    #[serde(default)]
    pub require_tls_for_auth: Option<bool>,
    /// Accept AUTH after HELO as well as after EHLO (RFC 4954 ties AUTH to EHLO; some
    /// old devices send HELO and then AUTH anyway). Default false; on in the
    /// legacy-device profile.
    #[serde(default)]
    pub auth_after_helo: Option<bool>,
    /// Put the logged-in user's name in the Received header. Default false: the
    /// header travels with the message to its recipients.
    #[serde(default)]
    pub received_header_user: bool,
    #[serde(default)]
    pub profile: Option<ListenerProfile>,
}

/// Loopback only: never an open relay by default.
pub fn default_relay_networks() -> Vec<IpNet> {
    ["127.0.0.0/8", "::1/128"]
        .iter()
        .filter_map(|network| network.parse().ok())
        .collect()
}

impl ListenerConfig {
    /// A plain listener with the defaults, relaying for loopback.
    pub fn plain(address: SocketAddr) -> Self {
        Self {
            address,
            relay_networks: default_relay_networks(),
            mode: ListenerMode::Smtp,
            certificate_file: None,
            key_file: None,
            require_auth: false,
            require_tls_for_auth: None,
            auth_after_helo: None,
            received_header_user: false,
            profile: None,
        }
    }

    fn legacy(&self) -> bool {
        self.profile == Some(ListenerProfile::LegacyDevice)
    }

    /// Whether AUTH needs TLS first, after the profile is applied.
    pub fn tls_required_for_auth(&self) -> bool {
        self.require_tls_for_auth.unwrap_or(!self.legacy())
    }

    /// Whether AUTH is accepted after HELO, after the profile is applied.
    pub fn allows_auth_after_helo(&self) -> bool {
        self.auth_after_helo.unwrap_or(self.legacy())
    }

    /// Whether this listener has a certificate (STARTTLS offered, or implicit TLS).
    pub fn has_tls(&self) -> bool {
        self.certificate_file.is_some()
    }

    /// The relaxations in effect, in words, for `check-config` and the start-up log.
    pub fn relaxations(&self) -> Vec<&'static str> {
        let mut relaxed = Vec::new();
        if !self.tls_required_for_auth() {
            relaxed.push("AUTH without TLS: passwords cross the network in clear text");
        }
        if self.allows_auth_after_helo() {
            relaxed.push("AUTH after HELO (RFC 4954 needs EHLO)");
        }
        relaxed
    }

    pub(crate) fn validate(&self) -> Result<(), (&'static str, String)> {
        match (&self.certificate_file, &self.key_file) {
            (Some(_), None) => {
                return Err((
                    "key_file",
                    format!("listener {}: certificate_file needs key_file", self.address),
                ));
            }
            (None, Some(_)) => {
                return Err((
                    "certificate_file",
                    format!("listener {}: key_file needs certificate_file", self.address),
                ));
            }
            _ => {}
        }
        if self.mode == ListenerMode::Smtps && !self.has_tls() {
            return Err((
                "mode",
                format!(
                    "listener {}: mode \"smtps\" (implicit TLS) needs certificate_file and key_file",
                    self.address
                ),
            ));
        }
        if self.require_auth && self.tls_required_for_auth() && !self.has_tls() {
            return Err((
                "require_auth",
                format!(
                    "listener {}: require_auth with require_tls_for_auth (the default) needs a certificate, \
                     or no client could ever log in; set certificate_file and key_file, \
                     or require_tls_for_auth = false for a trusted LAN",
                    self.address
                ),
            ));
        }
        Ok(())
    }

    /// One line for `check-config`.
    pub fn summary(&self, users: usize) -> String {
        let networks: Vec<String> = self
            .relay_networks
            .iter()
            .map(ToString::to_string)
            .collect();
        let relay = if networks.is_empty() {
            "nobody".to_string()
        } else {
            networks.join(", ")
        };
        let tls = match (self.mode, self.has_tls()) {
            (ListenerMode::Smtps, _) => "implicit TLS",
            (ListenerMode::Smtp, true) => "STARTTLS offered",
            (ListenerMode::Smtp, false) => "no TLS",
        };
        let auth = if users == 0 {
            "AUTH not offered (no users)".to_string()
        } else if self.tls_required_for_auth() && !self.has_tls() {
            "AUTH not offered (no certificate, and AUTH needs TLS)".to_string()
        } else if self.require_auth {
            "AUTH required".to_string()
        } else {
            "AUTH offered".to_string()
        };
        let mut line = format!(
            "listener {}: {tls}, {auth}, relay without AUTH for {relay}",
            self.address
        );
        if self.require_auth {
            line = format!(
                "listener {}: {tls}, {auth}; nobody relays without it",
                self.address
            );
        }
        if let Some(file) = &self.certificate_file {
            line.push_str(&format!("; certificate {}", file.display()));
        }
        for relaxation in self.relaxations() {
            line.push_str(&format!("\n  relaxed: {relaxation}"));
        }
        line
    }
}

/// `[rate_limits]`: sending limits per logged-in user and per client address (IPv6
/// counted per /64). Unset limits do not apply; the defaults set none. Exceeding one
/// gets `451 4.7.1` at MAIL, `452 4.7.1` at RCPT or `451 4.7.1` after the content, with
/// the time until the limit allows more; a transaction with more recipients than a
/// limit allows at all gets `452 4.5.3` for the excess.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    #[serde(default)]
    pub per_user: RateLimitTable,
    #[serde(default)]
    pub per_client: RateLimitTable,
    /// Users and client addresses remembered at once (least recently used forgotten).
    #[serde(default = "default_tracked_keys")]
    pub max_tracked_keys: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            per_user: RateLimitTable::default(),
            per_client: RateLimitTable::default(),
            max_tracked_keys: default_tracked_keys(),
        }
    }
}

fn default_tracked_keys() -> usize {
    tsubame_policy::DEFAULT_LIMITER_MAX_KEYS
}

/// Messages and recipients per minute, hour and day: the policy's own type.
pub type RateLimitTable = RateLimits;

impl RateLimitConfig {
    pub(crate) fn validate(&self) -> Result<(), (&'static str, String)> {
        for (key, table) in [
            ("per_user", &self.per_user),
            ("per_client", &self.per_client),
        ] {
            tsubame_policy::Limiter::new(*table, self.max_tracked_keys)
                .map_err(|error| (key, format!("rate_limits.{key}: {error}")))?;
        }
        Ok(())
    }

    pub fn summary(&self) -> Option<String> {
        let mut parts = Vec::new();
        if !self.per_user.is_empty() {
            parts.push(format!("per user {}", self.per_user.describe()));
        }
        if !self.per_client.is_empty() {
            parts.push(format!("per client address {}", self.per_client.describe()));
        }
        (!parts.is_empty()).then(|| format!("rate limits: {}", parts.join("; ")))
    }
}

/// `[login_guard]`: brute-force defence for AUTH. After `delay_after_failures` failed
/// logins from one address or for one user, every attempt waits a growing delay; after
/// `lockout_after_failures` the address or user is refused with `454 4.7.0` for
/// `lockout_secs`.
pub type LoginGuardConfig = LoginPolicy;

pub(crate) fn validate_login_guard(policy: &LoginPolicy) -> Result<(), (&'static str, String)> {
    tsubame_policy::LoginGuard::new(*policy)
        .map(|_| ())
        .map_err(|error| ("login_guard", format!("login_guard: {error}")))
}

pub fn login_guard_summary(policy: &LoginPolicy) -> String {
    format!(
        "login guard: delays after {} failed logins, {} s lockout after {}",
        policy.delay_after_failures, policy.lockout_secs, policy.lockout_after_failures
    )
}
