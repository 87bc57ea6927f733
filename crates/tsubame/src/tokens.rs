//! The relay's access tokens: `[[oauth]]` sources from the configuration, built on
//! `tsubame-oauth`'s cache, behind the relay's `TokenSource`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use tsubame_config::{Config, OAuthConfig, OAuthKind};
use tsubame_oauth::http::Endpoint;
use tsubame_oauth::{
    AccessToken, HttpClient, HttpSettings, RefreshToken, ServiceAccount, TokenCache, TokenError,
    TokenKey,
};
use tsubame_relay::tokens::{TokenFailure, TokenSources};

/// Every configured source in one cache, and the relay's view of each.
pub fn build(config: &Config) -> anyhow::Result<(Arc<TokenCache>, TokenSources)> {
    let cache = Arc::new(TokenCache::with_defaults());
    let mut sources = TokenSources::new();
    for source in &config.oauth_sources {
        let http = HttpClient::new(HttpSettings::default())
            .with_context(|| format!("oauth {:?}", source.name))?;
        let endpoint = Endpoint::parse(&source.token_endpoint)
            .with_context(|| format!("oauth {:?}: token_endpoint", source.name))?;
        let fetcher: Arc<dyn tsubame_oauth::TokenSource> = match source.kind {
            OAuthKind::RefreshToken => Arc::new(PerAccountRefreshTokens {
                client_id: source.client_id.clone().unwrap_or_default(),
                client_secret: tsubame_oauth::Secret::new(
                    source
                        .client_secret()
                        .map_err(anyhow::Error::msg)?
                        .expose()
                        .to_string(),
                ),
                endpoint,
                config: source.clone(),
                http,
            }),
            OAuthKind::ServiceAccount => {
                let key_file = source.key_file.clone().unwrap_or_default();
                Arc::new(
                    ServiceAccount::from_key_file(&key_file, http)
                        .with_context(|| {
                            format!("oauth {:?}: key_file {}", source.name, key_file.display())
                        })?
                        .with_token_endpoint(endpoint)
                        .with_scope(source.scope.clone()),
                )
            }
        };
        cache.add_source(source.name.clone(), fetcher);
        sources.insert(
            source.name.clone(),
            Arc::new(CachedTokens {
                cache: Arc::clone(&cache),
                source: source.name.clone(),
            }),
        );
    }
    Ok((cache, sources))
}

/// An installed-app client with one refresh token per account, each in its file under
/// `token_directory` (read at each refresh, so a new authorisation takes effect without
/// a restart).
#[derive(Debug)]
struct PerAccountRefreshTokens {
    client_id: String,
    client_secret: tsubame_oauth::Secret,
    endpoint: Endpoint,
    config: OAuthConfig,
    http: HttpClient,
}

impl PerAccountRefreshTokens {
    fn file(&self, account: &str) -> PathBuf {
        self.config
            .refresh_token_file(account)
            .unwrap_or_else(|| PathBuf::from(format!("{account}.token")))
    }
}

impl tsubame_oauth::TokenSource for PerAccountRefreshTokens {
    fn fetch(&self, account: &str, now: SystemTime) -> Result<AccessToken, TokenError> {
        RefreshToken::from_token_file(
            self.client_id.clone(),
            self.client_secret.clone(),
            self.endpoint.clone(),
            self.file(account),
            self.http.clone(),
        )
        .fetch(account, now)
    }
}

/// One source of the shared cache, as the relay asks for it.
#[derive(Debug)]
struct CachedTokens {
    cache: Arc<TokenCache>,
    source: String,
}

impl tsubame_relay::tokens::TokenSource for CachedTokens {
    fn token(&self, account: &str) -> Result<tsubame_delivery::Secret, TokenFailure> {
        self.cache
            .get(&TokenKey::new(self.source.clone(), account))
            .map(|token| tsubame_delivery::Secret::new(token.secret()))
            .map_err(|error| TokenFailure {
                needs_authorization: error.needs_reauthorization(),
                detail: error.to_string(),
            })
    }

    fn accepted(&self, account: &str) {
        self.cache
            .accepted(&TokenKey::new(self.source.clone(), account));
    }

    fn rejected(&self, account: &str, token: &tsubame_delivery::Secret) {
        let key = TokenKey::new(self.source.clone(), account);
        // The cache drops a token only if it is still the one it holds.
        if let Ok(current) = self.cache.get(&key)
            && current.secret() == token.expose()
        {
            self.cache.invalidate(&key, &current);
        }
    }
}

/// Where `serve` keeps the token cache's state for `tsubame oauth status`.
pub fn status_path(spool: &std::path::Path) -> PathBuf {
    spool.join("oauth-status.json")
}

/// The cache's state as JSON (no token, no secret: times, counts and errors).
pub fn status_json(cache: &TokenCache) -> serde_json::Value {
    let seconds = |time: Option<SystemTime>| {
        time.and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|elapsed| elapsed.as_secs())
    };
    let accounts: Vec<serde_json::Value> = cache
        .status()
        .into_iter()
        .map(|status| {
            serde_json::json!({
                "source": status.key.source,
                "account": status.key.account,
                "has_token": status.has_token,
                "expires_at_unix": seconds(status.expires_at),
                "last_refresh_at_unix": seconds(status.last_refresh_at),
                "refresh_count": status.refresh_count,
                "consecutive_failures": status.consecutive_failures,
                "last_error": status.last_error,
                "retry_at_unix": seconds(status.retry_at),
                "needs_reauthorization": status.needs_reauthorization,
            })
        })
        .collect();
    serde_json::json!({ "written_at_unix": seconds(Some(SystemTime::now())), "accounts": accounts })
}

/// Writes [`status_json`] to `path` every few seconds while the server runs (a temp
/// file renamed over it, mode 0600), until `stop` is set.
pub fn keep_status_file(
    cache: Arc<TokenCache>,
    path: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    const INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
    std::thread::Builder::new()
        .name("oauth-status".to_string())
        .spawn(move || {
            let mut last = String::new();
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let mut now = status_json(&cache);
                let written_at = now["written_at_unix"].take();
                let text = now.to_string();
                if text != last {
                    now["written_at_unix"] = written_at;
                    let mut text = now.to_string();
                    text.push('\n');
                    if let Err(error) =
                        tsubame_relay::private_file::replace(&path, text.as_bytes())
                    {
                        tracing::warn!(file = %path.display(), %error, "cannot write the OAuth status file");
                    }
                    last = text;
                }
                std::thread::park_timeout(INTERVAL);
            }
        })
}
