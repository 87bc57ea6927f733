//! `[[oauth]]`: where access tokens for XOAUTH2 and OAUTHBEARER logins come from.
//!
//! Two kinds, both Google's by default and both with configurable endpoints (for tests,
//! and for other providers with XOAUTH2 such as Microsoft 365):
//!
//! * `refresh-token`: an installed-app ("desktop") OAuth client; one refresh token per
//!   account, in `token_directory/<account>.token`, written by `tsubame oauth google
//!   authorize`.
//! * `service-account`: a Google Workspace service account's JSON key with domain-wide
//!   delegation; a signed assertion per account, no refresh token to keep.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::Secret;

/// Google's token endpoint.
pub const GOOGLE_TOKEN_ENDPOINT: &str = "https://oauth2.googleapis.com/token";
/// Google's consent page.
pub const GOOGLE_AUTHORIZATION_ENDPOINT: &str = "https://accounts.google.com/o/oauth2/v2/auth";
/// The scope SMTP needs: Gmail's narrower `gmail.send` is refused by smtp.gmail.com.
pub const GOOGLE_MAIL_SCOPE: &str = "https://mail.google.com/";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OAuthKind {
    RefreshToken,
    ServiceAccount,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthConfig {
    /// What upstreams call it (`oauth = "…"`).
    pub name: String,
    pub kind: OAuthKind,
    /// `refresh-token`: the OAuth client's id.
    #[serde(default)]
    pub client_id: Option<String>,
    /// `refresh-token`: file holding the client secret (first line). Keep it 0600.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// `refresh-token`: environment variable holding the client secret.
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// `refresh-token`: one refresh token per account, in `<account>.token` (mode 0600).
    #[serde(default)]
    pub token_directory: Option<PathBuf>,
    /// `service-account`: the JSON key file Google issues. Keep it 0600.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default = "default_token_endpoint")]
    pub token_endpoint: String,
    #[serde(default = "default_authorization_endpoint")]
    pub authorization_endpoint: String,
    #[serde(default = "default_scope")]
    pub scope: String,
}

fn default_token_endpoint() -> String {
    GOOGLE_TOKEN_ENDPOINT.to_string()
}

fn default_authorization_endpoint() -> String {
    GOOGLE_AUTHORIZATION_ENDPOINT.to_string()
}

fn default_scope() -> String {
    GOOGLE_MAIL_SCOPE.to_string()
}

impl OAuthConfig {
    pub(crate) fn validate(&self) -> Result<(), (&'static str, String)> {
        let name = &self.name;
        if name.is_empty() {
            return Err(("name", "an [[oauth]] source needs a name".to_string()));
        }
        for (key, url) in [
            ("token_endpoint", &self.token_endpoint),
            ("authorization_endpoint", &self.authorization_endpoint),
        ] {
            if !(url.starts_with("https://") || url.starts_with("http://127.0.0.1")) {
                return Err((
                    key,
                    format!(
                        "oauth {name:?}: {key} must be an https:// URL (http only on 127.0.0.1)"
                    ),
                ));
            }
        }
        match self.kind {
            OAuthKind::RefreshToken => {
                if self.client_id.as_deref().is_none_or(str::is_empty) {
                    return Err((
                        "client_id",
                        format!("oauth {name:?}: refresh-token needs client_id"),
                    ));
                }
                if self.client_secret_file.is_some() == self.client_secret_env.is_some() {
                    return Err((
                        "client_secret_file",
                        format!(
                            "oauth {name:?}: give client_secret_file or client_secret_env (one of them)"
                        ),
                    ));
                }
                if self.token_directory.is_none() {
                    return Err((
                        "token_directory",
                        format!(
                            "oauth {name:?}: refresh-token needs token_directory (where `tsubame oauth google authorize` stores the refresh tokens)"
                        ),
                    ));
                }
                if self.key_file.is_some() {
                    return Err((
                        "key_file",
                        format!("oauth {name:?}: key_file is for kind service-account"),
                    ));
                }
            }
            OAuthKind::ServiceAccount => {
                if self.key_file.is_none() {
                    return Err((
                        "key_file",
                        format!("oauth {name:?}: service-account needs key_file (the JSON key)"),
                    ));
                }
                if self.client_id.is_some()
                    || self.client_secret_file.is_some()
                    || self.client_secret_env.is_some()
                    || self.token_directory.is_some()
                {
                    return Err((
                        "client_id",
                        format!(
                            "oauth {name:?}: client_id, client secrets and token_directory are for kind refresh-token"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The client secret, from its file or variable. Errors name the source, never the
    /// value.
    pub fn client_secret(&self) -> Result<Secret, String> {
        crate::delivery::read_secret(
            &format!("oauth {:?}", self.name),
            self.client_secret_file.as_deref(),
            self.client_secret_env.as_deref(),
        )?
        .ok_or_else(|| format!("oauth {:?}: no client secret configured", self.name))
    }

    /// Where the refresh token of `account` is kept.
    pub fn refresh_token_file(&self, account: &str) -> Option<PathBuf> {
        self.token_directory
            .as_deref()
            .map(|directory| token_file_in(directory, account))
    }
}

/// `<directory>/<account>.token`, with anything but letters, digits, `@ . _ + -` in the
/// account replaced by `_` (an account is a mail address; this keeps it one file name).
pub fn token_file_in(directory: &Path, account: &str) -> PathBuf {
    let safe: String = account
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "@._+-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let safe = if safe.starts_with('.') {
        format!("_{safe}")
    } else {
        safe
    };
    directory.join(format!("{safe}.token"))
}
