//! [`TokenCache`]: access tokens shared by the delivery threads.
//!
//! One entry per [`TokenKey`] (a source's name and the account). [`TokenCache::get`]
//! answers from the entry while its token is fresh, and refreshes it ahead of expiry
//! otherwise. The rules, each there so that a burst of deliveries costs the token
//! endpoint at most one request:
//!
//! * **Refresh ahead.** A token is refreshed once it is within
//!   [`CacheSettings::refresh_margin`] of expiring (or past half its lifetime, for a
//!   token that lives less than twice the margin), so a delivery never starts with a
//!   token about to die.
//! * **One refresh at a time per key.** The first caller that finds the token stale
//!   refreshes it, without holding any lock that other keys need; other callers for
//!   the same key wait for that refresh and share its outcome, unless the old token
//!   still works, which they then use at once. Different keys refresh in parallel.
//! * **Backoff.** A failed refresh is remembered: until `backoff_initial`, doubling
//!   with each further failure up to `backoff_max`, `get` answers the last error at
//!   once (or the old token while it still works) instead of asking again.
//! * **Rejection.** [`TokenCache::invalidate`] drops a token the upstream refused
//!   (SMTP 535), if it is still the cached one, so the next `get` refreshes. An
//!   upstream that keeps refusing fresh tokens (a scope or delegation problem no
//!   refresh cures) is backed off like a failure from the second refusal in a row;
//!   a login the upstream accepted ([`TokenCache::accepted`]) ends the row, so a token
//!   that worked and is refused later is replaced at once.
//!
//! Times come from a [`Clock`] ([`SystemClock`], or [`ManualClock`] in tests). They are
//! wall-clock times, like the tokens' own expiry: a clock stepped back can make a
//! token look fresher than it is, and the upstream's rejection then refreshes it.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use crate::{AccessToken, TokenError, TokenSource};

/// Default [`CacheSettings::refresh_margin`]: Google's tokens live an hour; five
/// minutes ahead covers a slow refresh and a delivery that takes a while to reach AUTH.
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// Default [`CacheSettings::backoff_initial`].
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_secs(10);
/// Default [`CacheSettings::backoff_max`]: after an outage or a revoked grant is fixed,
/// tokens flow again within ten minutes without anyone restarting anything.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(10 * 60);
/// Default [`CacheSettings::wait_timeout`]: twice the HTTP client's whole-exchange
/// timeout ([`crate::http::DEFAULT_REQUEST_TIMEOUT`]).
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Default [`CacheSettings::keys_max`]: far more accounts than one relay sends as.
pub const DEFAULT_KEYS_MAX: usize = 10_000;

/// Where the cache's times come from.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to, for tests.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<SystemTime>,
}

impl ManualClock {
    pub fn new(start: SystemTime) -> Self {
        Self {
            now: Mutex::new(start),
        }
    }

    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        *now += by;
    }

    pub fn set(&self, to: SystemTime) {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner) = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Which token: the configured source's name and the account it is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenKey {
    pub source: String,
    pub account: String,
}

impl TokenKey {
    pub fn new(source: impl Into<String>, account: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            account: account.into(),
        }
    }
}

impl fmt::Display for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.source, self.account)
    }
}

/// The cache's timing and limits.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Refresh a token this long before it expires.
    pub refresh_margin: Duration,
    /// Wait after the first failed refresh; doubles with each further failure.
    pub backoff_initial: Duration,
    /// The longest wait between refreshes that fail.
    pub backoff_max: Duration,
    /// How long a caller waits for another caller's refresh of the same key before it
    /// gives up with [`TokenError::Temporary`].
    pub wait_timeout: Duration,
    /// Most keys held; a `get` for a new key beyond it fails with
    /// [`TokenError::Configuration`].
    pub keys_max: usize,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            refresh_margin: DEFAULT_REFRESH_MARGIN,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
            keys_max: DEFAULT_KEYS_MAX,
        }
    }
}

/// What the cache knows about one key, for `tsubame oauth status` and metrics. Holds
/// no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenStatus {
    pub key: TokenKey,
    /// Whether a token is cached (it may be past its refresh time).
    pub has_token: bool,
    /// When the cached token expires; `None` without a token or for a password.
    pub expires_at: Option<SystemTime>,
    /// When the last successful refresh finished.
    pub last_refresh_at: Option<SystemTime>,
    /// Successful refreshes since the cache started.
    pub refresh_count: u64,
    /// Failed refreshes since the last success.
    pub consecutive_failures: u32,
    /// The last failure's text (no secrets), until a refresh succeeds.
    pub last_error: Option<String>,
    /// No refresh is tried before this time (backoff).
    pub retry_at: Option<SystemTime>,
    /// The grant was refused: run the authorize flow again (or fix delegation).
    pub needs_reauthorization: bool,
}

/// Thread-safe cache of access tokens; see the [module documentation](self).
pub struct TokenCache {
    clock: Arc<dyn Clock>,
    settings: CacheSettings,
    sources: RwLock<HashMap<String, Arc<dyn TokenSource>>>,
    /// Invariant: at most `settings.keys_max` entries, each for a key whose source was
    /// known when it was made.
    entries: Mutex<HashMap<TokenKey, Arc<Entry>>>,
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sources: Vec<String> = read(&self.sources).keys().cloned().collect();
        sources.sort();
        f.debug_struct("TokenCache")
            .field("settings", &self.settings)
            .field("sources", &sources)
            .field("keys", &lock(&self.entries).len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Entry {
    state: Mutex<EntryState>,
    /// Signalled whenever a refresh of this entry ends.
    refreshed: Condvar,
}

#[derive(Debug, Default)]
struct EntryState {
    token: Option<AccessToken>,
    /// When the token should be replaced; `None` with no token or a token that does
    /// not expire. Invariant: `Some` only when `token` is `Some` and has an expiry, and
    /// then not after that expiry.
    refresh_at: Option<SystemTime>,
    /// A caller is fetching a new token now (outside the lock).
    refreshing: bool,
    /// Refresh attempts ended (success or failure); waiters watch it change.
    attempts: u64,
    refresh_count: u64,
    last_refresh_at: Option<SystemTime>,
    consecutive_failures: u32,
    /// Refusals of fresh tokens by the upstream in a row ([`TokenCache::invalidate`]);
    /// back to 0 when a token lives to its refresh time or the upstream accepts one
    /// ([`TokenCache::accepted`]).
    consecutive_rejections: u32,
    last_error: Option<TokenError>,
    retry_at: Option<SystemTime>,
}

impl EntryState {
    /// The token, if it is not yet due for refresh.
    fn fresh_token(&self, now: SystemTime) -> Option<&AccessToken> {
        let token = self.token.as_ref()?;
        match self.refresh_at {
            Some(refresh_at) if now >= refresh_at => None,
            _ => Some(token),
        }
    }

    /// The token, if it has not expired (it may be due for refresh).
    fn valid_token(&self, now: SystemTime) -> Option<&AccessToken> {
        self.token
            .as_ref()
            .filter(|token| token.expires_at().is_none_or(|expires_at| now < expires_at))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves the state as consistent as
    // between any two statements here (each update is a plain assignment); carry on.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Ends a refresh that unwound (a panicking source), so waiters do not wait forever.
struct RefreshGuard<'a> {
    entry: &'a Entry,
    armed: bool,
}

impl Drop for RefreshGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut state = lock(&self.entry.state);
            state.refreshing = false;
            state.attempts += 1;
            state.last_error = Some(TokenError::temporary("the token source panicked"));
            drop(state);
            self.entry.refreshed.notify_all();
        }
    }
}

impl TokenCache {
    pub fn new(settings: CacheSettings, clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            settings,
            sources: RwLock::new(HashMap::new()),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// A cache on the system clock with the default settings.
    pub fn with_defaults() -> Self {
        Self::new(CacheSettings::default(), Arc::new(SystemClock))
    }

    /// Adds the source `name`, or replaces it (forgetting its keys' tokens and errors).
    pub fn add_source(&self, name: impl Into<String>, source: Arc<dyn TokenSource>) {
        let name = name.into();
        let replaced = self
            .sources
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.clone(), source)
            .is_some();
        if replaced {
            lock(&self.entries).retain(|key, _| key.source != name);
        }
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    /// A usable token for `key`: the cached one while fresh, else a new one (see the
    /// [module documentation](self) for who refreshes and when).
    pub fn get(&self, key: &TokenKey) -> Result<AccessToken, TokenError> {
        let source = read(&self.sources)
            .get(&key.source)
            .cloned()
            .ok_or_else(|| {
                TokenError::configuration(format!("no token source named {:?}", key.source))
            })?;
        let entry = self.entry(key)?;
        let mut state = lock(&entry.state);
        loop {
            let now = self.clock.now();
            if let Some(token) = state.fresh_token(now) {
                return Ok(token.clone());
            }
            if state.refreshing {
                if let Some(token) = state.valid_token(now) {
                    return Ok(token.clone());
                }
                let seen = state.attempts;
                let (after, wait) = entry
                    .refreshed
                    .wait_timeout_while(state, self.settings.wait_timeout, |state| {
                        state.refreshing && state.attempts == seen
                    })
                    .unwrap_or_else(PoisonError::into_inner);
                state = after;
                if wait.timed_out() {
                    return Err(TokenError::temporary(format!(
                        "{key}: another thread's token refresh took more than {} s",
                        self.settings.wait_timeout.as_secs()
                    )));
                }
                if state.attempts != seen {
                    // Share the outcome of the refresh we waited for, even if its
                    // token is already due for refresh (a very short lifetime).
                    let now = self.clock.now();
                    if let Some(token) = state.valid_token(now) {
                        return Ok(token.clone());
                    }
                    if let Some(error) = &state.last_error {
                        return Err(error.clone());
                    }
                }
                continue;
            }
            if let Some(retry_at) = state.retry_at
                && now < retry_at
            {
                if let Some(token) = state.valid_token(now) {
                    return Ok(token.clone());
                }
                return Err(state.last_error.clone().unwrap_or_else(|| {
                    TokenError::temporary(format!("{key}: backing off after a failure"))
                }));
            }
            if state.token.is_some() {
                // The token lived to its refresh time without being refused.
                state.consecutive_rejections = 0;
            }
            state.refreshing = true;
            drop(state);
            return self.refresh(key, source.as_ref(), &entry, now);
        }
    }

    /// Fetches a new token for `key` and records the outcome. Called with
    /// `refreshing` set by this caller; clears it.
    fn refresh(
        &self,
        key: &TokenKey,
        source: &dyn TokenSource,
        entry: &Entry,
        started: SystemTime,
    ) -> Result<AccessToken, TokenError> {
        let mut guard = RefreshGuard { entry, armed: true };
        let result = source.fetch(&key.account, started);
        guard.armed = false;
        let now = self.clock.now();
        let mut state = lock(&entry.state);
        state.refreshing = false;
        state.attempts += 1;
        let outcome = match result {
            Ok(token) => {
                state.refresh_at = token.expires_at().map(|expires_at| {
                    let lifetime = expires_at.duration_since(started).unwrap_or_default();
                    expires_at - self.settings.refresh_margin.min(lifetime / 2)
                });
                state.token = Some(token.clone());
                state.refresh_count += 1;
                state.last_refresh_at = Some(now);
                state.consecutive_failures = 0;
                state.last_error = None;
                state.retry_at = None;
                tracing::info!(
                    key = %key,
                    expires_in_secs = token
                        .expires_at()
                        .and_then(|at| at.duration_since(now).ok())
                        .map(|left| left.as_secs()),
                    "access token refreshed"
                );
                Ok(token)
            }
            Err(error) => {
                state.consecutive_failures = state.consecutive_failures.saturating_add(1);
                let delay = self.backoff(state.consecutive_failures);
                state.retry_at = Some(now + delay);
                state.last_error = Some(error.clone());
                tracing::warn!(
                    key = %key,
                    %error,
                    failures = state.consecutive_failures,
                    retry_in_secs = delay.as_secs(),
                    "access token refresh failed"
                );
                // A refresh ahead of expiry that failed still leaves a working token.
                match state.valid_token(now) {
                    Some(token) => Ok(token.clone()),
                    None => Err(error),
                }
            }
        };
        drop(state);
        entry.refreshed.notify_all();
        outcome
    }

    /// The wait after the `failures`-th failure in a row (counting from 1).
    fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(u32::BITS - 1);
        self.settings
            .backoff_initial
            .saturating_mul(1u32 << doublings)
            .min(self.settings.backoff_max)
    }

    fn entry(&self, key: &TokenKey) -> Result<Arc<Entry>, TokenError> {
        let mut entries = lock(&self.entries);
        if let Some(entry) = entries.get(key) {
            return Ok(Arc::clone(entry));
        }
        if entries.len() >= self.settings.keys_max {
            return Err(TokenError::configuration(format!(
                "more than {} token keys (source, account) in use",
                self.settings.keys_max
            )));
        }
        let entry = Arc::new(Entry::default());
        entries.insert(key.clone(), Arc::clone(&entry));
        Ok(entry)
    }

    /// The upstream refused `token` (SMTP 535): drop it if it is still the one cached
    /// for `key`, so the next [`get`](Self::get) refreshes. Several threads refused
    /// the same token cause one refresh, not several.
    pub fn invalidate(&self, key: &TokenKey, token: &AccessToken) {
        let Some(entry) = lock(&self.entries).get(key).cloned() else {
            return;
        };
        let mut state = lock(&entry.state);
        if state.token.as_ref() != Some(token) {
            return;
        }
        let now = self.clock.now();
        state.token = None;
        state.refresh_at = None;
        state.consecutive_rejections = state.consecutive_rejections.saturating_add(1);
        let rejections = state.consecutive_rejections;
        if rejections >= 2 {
            // A fresh token refused again: refreshing will not cure this.
            let delay = self.backoff(rejections - 1);
            state.retry_at = Some(now + delay);
            state.last_error = Some(TokenError::temporary(format!(
                "the upstream refused {rejections} new tokens in a row for {key}; \
                 check the account's scope and delegation"
            )));
            tracing::warn!(key = %key, rejections, retry_in_secs = delay.as_secs(), "upstream keeps refusing new access tokens");
        } else {
            tracing::info!(key = %key, "upstream refused the access token; it will be refreshed");
        }
    }

    /// The upstream accepted a token for `key` (SMTP 235): the account's grant, scope
    /// and delegation work, so the next refusal is the first of a new row (refreshed at
    /// once), not the second of one that no refresh cures.
    pub fn accepted(&self, key: &TokenKey) {
        let Some(entry) = lock(&self.entries).get(key).cloned() else {
            return;
        };
        lock(&entry.state).consecutive_rejections = 0;
    }

    /// Forgets everything about `key`: its token, its errors and its backoff. For
    /// after the grant was fixed (the authorize flow was run again).
    pub fn reset(&self, key: &TokenKey) {
        lock(&self.entries).remove(key);
    }

    /// The state of every key, sorted by key.
    pub fn status(&self) -> Vec<TokenStatus> {
        let entries: Vec<(TokenKey, Arc<Entry>)> = lock(&self.entries)
            .iter()
            .map(|(key, entry)| (key.clone(), Arc::clone(entry)))
            .collect();
        let now = self.clock.now();
        let mut statuses: Vec<TokenStatus> = entries
            .into_iter()
            .map(|(key, entry)| {
                let state = lock(&entry.state);
                TokenStatus {
                    key,
                    has_token: state.token.is_some(),
                    expires_at: state.token.as_ref().and_then(AccessToken::expires_at),
                    last_refresh_at: state.last_refresh_at,
                    refresh_count: state.refresh_count,
                    consecutive_failures: state.consecutive_failures,
                    last_error: state.last_error.as_ref().map(ToString::to_string),
                    retry_at: state.retry_at.filter(|at| *at > now),
                    // Said as soon as a refresh is refused, even while the old token
                    // still works for a few minutes: the operator has that long.
                    needs_reauthorization: state
                        .last_error
                        .as_ref()
                        .is_some_and(TokenError::needs_reauthorization),
                }
            })
            .collect();
        statuses.sort_by(|a, b| a.key.cmp(&b.key));
        statuses
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::{Secret, TokenKind};

    /// A source that counts calls and answers from a script.
    #[derive(Debug)]
    struct Scripted {
        calls: AtomicUsize,
        /// Lifetime of the tokens it hands out; `None` = fail.
        outcome: Mutex<Result<Duration, TokenError>>,
        delay: Duration,
        in_flight: AtomicUsize,
        in_flight_max: AtomicUsize,
    }

    impl Scripted {
        fn new(lifetime: Duration) -> Arc<Self> {
            Arc::new(Self {
                calls: AtomicUsize::new(0),
                outcome: Mutex::new(Ok(lifetime)),
                delay: Duration::ZERO,
                in_flight: AtomicUsize::new(0),
                in_flight_max: AtomicUsize::new(0),
            })
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        fn set(&self, outcome: Result<Duration, TokenError>) {
            *self.outcome.lock().unwrap() = outcome;
        }
    }

    impl TokenSource for Scripted {
        fn fetch(&self, account: &str, now: SystemTime) -> Result<AccessToken, TokenError> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let in_flight = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.in_flight_max.fetch_max(in_flight, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let lifetime = self.outcome.lock().unwrap().clone()?;
            Ok(AccessToken::new(
                Secret::new(format!("{account}-{call}")),
                TokenKind::Bearer,
                Some(now + lifetime),
            ))
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    fn setup(source: Arc<Scripted>) -> (TokenCache, Arc<ManualClock>, TokenKey) {
        let clock = Arc::new(ManualClock::new(
            UNIX_EPOCH + Duration::from_secs(1_000_000),
        ));
        let cache = TokenCache::new(CacheSettings::default(), clock.clone());
        cache.add_source("google", source);
        (cache, clock, TokenKey::new("google", "a@example.com"))
    }

    #[test]
    fn cached_until_the_margin_then_refreshed() {
        let source = Scripted::new(HOUR);
        let (cache, clock, key) = setup(source.clone());
        assert_eq!(cache.get(&key).unwrap().secret(), "a@example.com-1");
        clock.advance(Duration::from_secs(3600 - 301));
        assert_eq!(cache.get(&key).unwrap().secret(), "a@example.com-1");
        assert_eq!(source.calls(), 1);
        clock.advance(Duration::from_secs(2));
        assert_eq!(cache.get(&key).unwrap().secret(), "a@example.com-2");
        assert_eq!(source.calls(), 2);
    }

    #[test]
    fn short_lived_tokens_are_refreshed_at_half_their_life() {
        let source = Scripted::new(Duration::from_secs(60));
        let (cache, clock, key) = setup(source.clone());
        cache.get(&key).unwrap();
        clock.advance(Duration::from_secs(29));
        cache.get(&key).unwrap();
        assert_eq!(source.calls(), 1);
        clock.advance(Duration::from_secs(1));
        cache.get(&key).unwrap();
        assert_eq!(source.calls(), 2);
    }

    #[test]
    fn failures_back_off_doubling_to_the_maximum() {
        let source = Scripted::new(HOUR);
        source.set(Err(TokenError::temporary("down")));
        let (cache, clock, key) = setup(source.clone());
        let mut expected_calls = 0;
        for wait_secs in [10, 20, 40, 80, 160, 320, 600, 600] {
            expected_calls += 1;
            assert!(cache.get(&key).is_err());
            assert_eq!(source.calls(), expected_calls);
            clock.advance(Duration::from_secs(wait_secs - 1));
            let error = cache.get(&key).unwrap_err();
            assert_eq!(error, TokenError::temporary("down"));
            assert_eq!(source.calls(), expected_calls, "no request during backoff");
            clock.advance(Duration::from_secs(1));
        }
        source.set(Ok(HOUR));
        assert!(cache.get(&key).is_ok());
        let status = &cache.status()[0];
        assert_eq!(status.consecutive_failures, 0);
        assert_eq!(status.last_error, None);
        assert_eq!(status.refresh_count, 1);
    }

    #[test]
    fn a_failed_refresh_ahead_keeps_the_working_token() {
        let source = Scripted::new(HOUR);
        let (cache, clock, key) = setup(source.clone());
        cache.get(&key).unwrap();
        source.set(Err(TokenError::temporary("down")));
        clock.advance(Duration::from_secs(3600 - 200));
        assert_eq!(cache.get(&key).unwrap().secret(), "a@example.com-1");
        clock.advance(Duration::from_secs(9));
        assert_eq!(cache.get(&key).unwrap().secret(), "a@example.com-1");
        assert_eq!(source.calls(), 2, "backoff holds even with a working token");
        clock.advance(Duration::from_secs(191));
        assert_eq!(
            cache.get(&key).unwrap_err(),
            TokenError::temporary("down"),
            "expired now"
        );
        assert_eq!(source.calls(), 3);
        assert!(cache.get(&key).is_err());
        assert_eq!(source.calls(), 3, "backing off");
    }

    #[test]
    fn invalid_grant_shows_in_status() {
        let source = Scripted::new(HOUR);
        source.set(Err(TokenError::InvalidGrant {
            reason: "revoked".into(),
        }));
        let (cache, _clock, key) = setup(source);
        assert!(cache.get(&key).unwrap_err().needs_reauthorization());
        let status = cache.status();
        assert_eq!(status.len(), 1);
        assert!(status[0].needs_reauthorization);
        assert_eq!(
            status[0].last_error.as_deref(),
            Some("re-authorisation needed: revoked")
        );
        assert!(status[0].retry_at.is_some());
        cache.reset(&key);
        assert!(cache.status().is_empty());
    }

    #[test]
    fn a_refused_grant_shows_while_the_old_token_still_works() {
        let source = Scripted::new(HOUR);
        let (cache, clock, key) = setup(source.clone());
        cache.get(&key).unwrap();
        source.set(Err(TokenError::InvalidGrant {
            reason: "revoked".into(),
        }));
        clock.advance(Duration::from_secs(3600 - 60));
        assert_eq!(cache.get(&key).unwrap().secret(), "a@example.com-1");
        let status = &cache.status()[0];
        assert!(status.has_token);
        assert!(status.needs_reauthorization);
    }

    #[test]
    fn invalidate_refreshes_once_then_backs_off_repeated_refusals() {
        let source = Scripted::new(HOUR);
        let (cache, clock, key) = setup(source.clone());
        let first = cache.get(&key).unwrap();
        cache.invalidate(&key, &first);
        cache.invalidate(&key, &first); // a second thread with the same token
        let second = cache.get(&key).unwrap();
        assert_eq!(second.secret(), "a@example.com-2");
        assert_eq!(source.calls(), 2);
        // An old token's refusal does not drop the new one.
        cache.invalidate(&key, &first);
        assert_eq!(cache.get(&key).unwrap(), second);
        // The fresh token is refused too: back off.
        cache.invalidate(&key, &second);
        assert!(cache.get(&key).is_err());
        assert_eq!(source.calls(), 2);
        clock.advance(Duration::from_secs(10));
        assert_eq!(cache.get(&key).unwrap().secret(), "a@example.com-3");
    }

    #[test]
    fn a_token_refused_after_an_accepted_login_is_replaced_at_once() {
        let source = Scripted::new(HOUR);
        let (cache, _clock, key) = setup(source.clone());
        let first = cache.get(&key).unwrap();
        cache.invalidate(&key, &first);
        let second = cache.get(&key).unwrap();
        // The second token worked for a while, then is refused: not "two in a row".
        cache.accepted(&key);
        cache.invalidate(&key, &second);
        assert_eq!(cache.get(&key).unwrap().secret(), "a@example.com-3");
        assert_eq!(source.calls(), 3);
        // Without an accepted login between, the next refusal backs off.
        let third = cache.get(&key).unwrap();
        cache.invalidate(&key, &third);
        assert!(cache.get(&key).is_err());
        assert_eq!(source.calls(), 3);
        // An unknown key is no error.
        cache.accepted(&TokenKey::new("google", "nobody@example.com"));
    }

    #[test]
    fn unknown_sources_and_key_limit() {
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH));
        let cache = TokenCache::new(
            CacheSettings {
                keys_max: 2,
                ..CacheSettings::default()
            },
            clock,
        );
        cache.add_source("s", Scripted::new(HOUR));
        assert!(matches!(
            cache.get(&TokenKey::new("nope", "a")),
            Err(TokenError::Configuration { .. })
        ));
        cache.get(&TokenKey::new("s", "a")).unwrap();
        cache.get(&TokenKey::new("s", "b")).unwrap();
        cache.get(&TokenKey::new("s", "a")).unwrap();
        assert!(matches!(
            cache.get(&TokenKey::new("s", "c")),
            Err(TokenError::Configuration { .. })
        ));
    }

    #[test]
    fn concurrent_callers_share_one_refresh_and_keys_are_independent() {
        let source = Arc::new(Scripted {
            calls: AtomicUsize::new(0),
            outcome: Mutex::new(Ok(HOUR)),
            delay: Duration::from_millis(300),
            in_flight: AtomicUsize::new(0),
            in_flight_max: AtomicUsize::new(0),
        });
        let (cache, _clock, _) = setup(source.clone());
        let cache = Arc::new(cache);
        let threads: Vec<_> = (0..32)
            .map(|index| {
                let cache = Arc::clone(&cache);
                std::thread::spawn(move || {
                    let key = TokenKey::new("google", format!("{}@example.com", index % 2));
                    cache.get(&key).unwrap().secret().to_string()
                })
            })
            .collect();
        let mut tokens: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        tokens.sort();
        tokens.dedup();
        assert_eq!(tokens.len(), 2, "{tokens:?}");
        assert_eq!(source.calls(), 2);
        // The two keys were refreshed at the same time.
        assert_eq!(source.in_flight_max.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_panicking_source_does_not_strand_waiters() {
        #[derive(Debug)]
        struct Panics;
        impl TokenSource for Panics {
            fn fetch(&self, _: &str, _: SystemTime) -> Result<AccessToken, TokenError> {
                panic!("boom")
            }
        }
        let cache = TokenCache::new(
            CacheSettings::default(),
            Arc::new(ManualClock::new(UNIX_EPOCH)),
        );
        cache.add_source("p", Arc::new(Panics));
        let key = TokenKey::new("p", "a");
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cache.get(&key)));
        assert!(result.is_err());
        // Not stuck "refreshing": the next caller tries again.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cache.get(&key)));
        assert!(result.is_err());
    }

    #[test]
    fn cache_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<TokenCache>();
        assert_send_sync::<AccessToken>();
    }
}
