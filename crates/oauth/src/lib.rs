//! OAuth 2.0 access tokens for SMTP XOAUTH2, as used by `smtp.gmail.com`.
//!
//! Google no longer accepts passwords for SMTP AUTH on Google accounts; a relay that
//! delivers through `smtp.gmail.com` authenticates with XOAUTH2 and a short-lived
//! (about an hour) OAuth 2.0 access token. This crate obtains those tokens, keeps them
//! fresh, and does the one-time interactive authorisation on a headless server.
//!
//! * [`source`]: where tokens come from, behind one trait, [`TokenSource`]:
//!   - [`RefreshToken`]: an installed-app client's long-lived refresh token, exchanged
//!     at the token endpoint (RFC 6749 §6);
//!   - [`ServiceAccount`]: a Google Workspace service account with domain-wide
//!     delegation, which signs an RS256 JWT assertion per account (RFC 7523);
//!   - [`StaticPassword`]: an app password, returned as it is, so callers treat all
//!     three alike.
//! * [`cache`]: [`TokenCache`], shared by the delivery threads: one token per
//!   (source, account) key, refreshed ahead of expiry, one refresh at a time per key,
//!   failures remembered with exponential backoff, [`TokenCache::invalidate`] when the
//!   upstream rejects a token, and [`TokenCache::status`] for the operator.
//! * [`authorize`]: the headless authorisation-code flow with PKCE (RFC 7636) for an
//!   installed ("desktop") client: the consent URL, a loopback redirect receiver
//!   (RFC 8252 §7.3), parsing a pasted code or redirected URL, and the code exchange.
//! * [`token_file`]: the refresh token on disk, mode 0600, replaced atomically.
//! * [`http`]: a small blocking HTTP/1.1 client (POST a form, read a bounded answer)
//!   over `std::net` and rustls with the `ring` provider, with timeouts.
//!
//! # Errors
//!
//! Every failure is a [`TokenError`]. For mail none of them is permanent: a message
//! whose token cannot be had is deferred, never bounced. [`TokenError::InvalidGrant`]
//! says a person has to authorise again (`tsubame oauth google authorize`);
//! [`TokenError::Configuration`] says the configuration or a file it names is wrong;
//! [`TokenError::Temporary`] is worth retrying by itself.
//!
//! # Secrets
//!
//! Client secrets, refresh tokens, access tokens and private keys are held in
//! [`Secret`] or behind types whose `Debug` does not show them, and no error message
//! contains one. Access tokens are read through [`AccessToken::secret`] only.
#![forbid(unsafe_code)]

pub mod authorize;
mod base64url;
pub mod cache;
pub mod http;
mod jwt;
pub mod source;
pub mod token_file;

pub use cache::{CacheSettings, Clock, SystemClock, TokenCache, TokenKey, TokenStatus};
pub use http::{HttpClient, HttpSettings};
pub use source::{RefreshToken, ServiceAccount, StaticPassword, TokenSource};

use std::fmt;
use std::time::SystemTime;

/// Google's OAuth 2.0 authorisation endpoint (for the consent page).
pub const GOOGLE_AUTH_ENDPOINT: &str = "https://accounts.google.com/o/oauth2/v2/auth";
/// Google's OAuth 2.0 token endpoint.
pub const GOOGLE_TOKEN_ENDPOINT: &str = "https://oauth2.googleapis.com/token";
/// The scope that allows SMTP, IMAP and POP access to Gmail; the only one that allows
/// XOAUTH2 to `smtp.gmail.com`.
pub const GMAIL_SCOPE: &str = "https://mail.google.com/";

/// A secret string: a client secret, refresh token or app password. `Debug` shows only
/// that it is there; [`Secret::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

/// What an [`AccessToken`] is for on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// An OAuth 2.0 bearer token: SMTP AUTH XOAUTH2.
    Bearer,
    /// A password (an app password from [`StaticPassword`]): SMTP AUTH PLAIN or LOGIN.
    Password,
}

/// A credential for one upstream login: an OAuth access token, or a static password.
/// `Debug` never shows the secret; read it with [`AccessToken::secret`].
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken {
    secret: Secret,
    kind: TokenKind,
    /// When the issuer says the token stops working; `None` for a password, which does
    /// not expire by itself.
    expires_at: Option<SystemTime>,
}

impl AccessToken {
    pub fn new(secret: Secret, kind: TokenKind, expires_at: Option<SystemTime>) -> Self {
        Self {
            secret,
            kind,
            expires_at,
        }
    }

    /// The token (or password) to send. Never log it.
    pub fn secret(&self) -> &str {
        self.secret.expose()
    }

    pub fn kind(&self) -> TokenKind {
        self.kind
    }

    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("kind", &self.kind)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Why no token could be had. No variant's text contains a secret. For mail, every
/// variant means "defer and retry later", never "bounce".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The authorisation server refused the grant (`invalid_grant`, or for a service
    /// account `unauthorized_client`): the refresh token was revoked or expired, or the
    /// service account lacks domain-wide delegation for the account. A person has to
    /// authorise again; retrying alone will not help.
    #[error("re-authorisation needed: {reason}")]
    InvalidGrant { reason: String },
    /// A network failure, timeout, 5xx or other refusal that may pass by itself.
    #[error("temporary failure: {reason}")]
    Temporary { reason: String },
    /// The configuration or a file it names is wrong: an unreadable or malformed key
    /// or token file, an unknown source, an endpoint that is not https.
    #[error("configuration: {reason}")]
    Configuration { reason: String },
}

impl TokenError {
    pub(crate) fn temporary(reason: impl Into<String>) -> Self {
        Self::Temporary {
            reason: reason.into(),
        }
    }

    pub(crate) fn configuration(reason: impl Into<String>) -> Self {
        Self::Configuration {
            reason: reason.into(),
        }
    }

    /// Whether a person has to act (authorise again, or fix the configuration) before
    /// tokens can be had.
    pub fn needs_operator(&self) -> bool {
        !matches!(self, Self::Temporary { .. })
    }

    /// Whether the grant was refused: run the authorize flow again.
    pub fn needs_reauthorization(&self) -> bool {
        matches!(self, Self::InvalidGrant { .. })
    }
}

/// Peer-supplied text (an `error_description`) made safe to put in a log line: control
/// characters replaced, at most [`PEER_TEXT_CHARS_MAX`] characters.
pub(crate) fn sanitize_peer_text(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(PEER_TEXT_CHARS_MAX)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().count() > PEER_TEXT_CHARS_MAX {
        out.push('…');
    }
    out
}

/// Longest piece of a peer's error text kept in an error: enough for Google's
/// `error_description` sentences (≈ 100 characters), short enough for one log line.
pub(crate) const PEER_TEXT_CHARS_MAX: usize = 200;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_secrets() {
        let token = AccessToken::new(
            Secret::new("ya29.very-secret"),
            TokenKind::Bearer,
            Some(SystemTime::UNIX_EPOCH),
        );
        let shown = format!("{token:?} {:?}", Secret::new("hunter2"));
        assert!(!shown.contains("very-secret"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(token.secret(), "ya29.very-secret");
    }

    #[test]
    fn peer_text_is_bounded_and_printable() {
        assert_eq!(sanitize_peer_text("Bad\r\nRequest"), "Bad??Request");
        let long = "x".repeat(1000);
        assert_eq!(
            sanitize_peer_text(&long).chars().count(),
            PEER_TEXT_CHARS_MAX + 1
        );
    }
}
