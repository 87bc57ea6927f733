//! Access tokens for upstreams that log in with OAuth2 (XOAUTH2, OAUTHBEARER).
//!
//! The relay does not know where tokens come from: the binary gives it one
//! [`TokenSource`] per `[[oauth]]` name (built on `tsubame-oauth`'s cache), and workers
//! ask it for the account a message goes out as.

use std::collections::HashMap;
use std::sync::Arc;

use tsubame_delivery::Secret;

/// Why no token could be had. Never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFailure {
    /// For the log and the deferral reason.
    pub detail: String,
    /// The grant is invalid or revoked: nothing works until someone authorises again.
    /// Mail is deferred all the same, never bounced.
    pub needs_authorization: bool,
}

/// One `[[oauth]]` source, shared by every worker.
pub trait TokenSource: Send + Sync + std::fmt::Debug {
    /// A current access token for `account` (cached; refreshed when near expiry).
    fn token(&self, account: &str) -> Result<Secret, TokenFailure>;
    /// The upstream refused `token` for `account`: forget it, so the next call gets a
    /// fresh one.
    fn rejected(&self, account: &str, token: &Secret);
    /// The upstream accepted a token for `account` (AUTH succeeded): refusals before it
    /// say nothing about the next one, which gets a fresh token at once again.
    fn accepted(&self, account: &str);
}

/// Token sources by `[[oauth]]` name.
pub type TokenSources = HashMap<String, Arc<dyn TokenSource>>;
