//! Password checks off the event loops.
//!
//! An argon2id verification takes tens of milliseconds of CPU and 19 MiB of memory: on
//! an event loop it would stall every other session. A loop hands the credentials to
//! this pool with the loop's own channel and waker; a worker checks them and sends the
//! outcome back, and the loop answers the client when the outcome is due (later, when
//! the login guard asked for a delay).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::{Token, Waker};
use ring::hmac;
use tsubame_config::{Config, VerifyError};
use tsubame_smtp_proto::sasl::Credentials;

/// Successful logins remembered for `[auth] login_cache_secs`, so a device that logs in
/// for every message costs one argon2 check per period, not one per message.
///
/// Only logins that succeeded are kept, one entry per account (so at most as many as
/// there are accounts), and only as an HMAC-SHA256 of the password under a key drawn at
/// start: nothing here can be turned back into a password without that key, and the key
/// never leaves the process. A different password for a remembered account is not a
/// match and goes to the full check (and the login guard) as usual.
///
/// Each entry carries the accounts epoch it was checked under: a reload that changes the
/// accounts starts a new epoch, and only entries of the current epoch, asked for by a
/// connection of the current epoch, are recalled. So a check against the old accounts
/// that finishes after the reload (a session opened before it, a job still queued) can
/// never let the old password in for new connections.
#[derive(Debug)]
pub(crate) struct LoginCache {
    /// `None` when the cache is off.
    key: Option<hmac::Key>,
    ttl: Duration,
    /// The current accounts epoch (see [`LoginCache::new_accounts`]).
    epoch: AtomicU64,
    entries: Mutex<HashMap<String, (hmac::Tag, Instant, u64)>>,
}

impl LoginCache {
    pub fn new(ttl: Duration) -> Self {
        let key = (!ttl.is_zero())
            .then(|| hmac::Key::generate(hmac::HMAC_SHA256, &ring::rand::SystemRandom::new()).ok())
            .flatten();
        if !ttl.is_zero() && key.is_none() {
            tracing::warn!("no random key for the login cache; every login is checked in full");
        }
        Self {
            key,
            ttl,
            epoch: AtomicU64::new(0),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Whether these credentials logged in successfully less than the cache's period
    /// ago, under the accounts of `epoch`, which is still the current one.
    pub fn recalls(&self, credentials: &Credentials, now: Instant, epoch: u64) -> bool {
        let Some(key) = &self.key else {
            return false;
        };
        if credentials.authzid.is_some() || epoch != self.epoch.load(Ordering::Acquire) {
            return false;
        }
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(&credentials.username)
            .is_some_and(|(tag, expires, checked_in)| {
                *checked_in == epoch
                    && now < *expires
                    && hmac::verify(key, credentials.password().expose(), tag.as_ref()).is_ok()
            })
    }

    /// The accounts changed (a configuration reload): forgets every remembered login
    /// and starts a new epoch, which it returns for the new accounts.
    pub fn new_accounts(&self) -> u64 {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.clear();
        self.epoch.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The current accounts epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Remembers a login checked against the accounts of `epoch`; one checked against
    /// accounts that a reload has since replaced is not kept.
    pub fn remember(&self, credentials: &Credentials, now: Instant, epoch: u64) {
        let Some(key) = &self.key else {
            return;
        };
        let tag = hmac::sign(key, credentials.password().expose());
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        // Under the lock: `new_accounts` clears and moves the epoch under it too.
        if epoch == self.epoch.load(Ordering::Acquire) {
            entries.insert(credentials.username.clone(), (tag, now + self.ttl, epoch));
        }
    }
}

/// What became of a login attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Accepted,
    /// Wrong password, unknown user, a refused authorization identity: all `535`. The
    /// reason is for the log only.
    Rejected(&'static str),
    /// The login guard refused the attempt without checking it: `454 4.7.0`.
    LockedOut,
    /// The check itself failed (not the client's fault): `454 4.7.0`.
    Unavailable,
}

/// A finished check, on its way back to the loop that asked.
#[derive(Debug)]
pub(crate) struct LoginDone {
    pub token: Token,
    pub connection_id: u64,
    pub username: String,
    pub outcome: Outcome,
    /// Not before this time is the client answered.
    pub answer_at: Instant,
}

#[derive(Debug)]
pub(crate) struct LoginJob {
    pub token: Token,
    pub connection_id: u64,
    pub credentials: Credentials,
    /// The configuration whose accounts the check uses: the connection's own, so a
    /// session sees one set of accounts from start to end.
    pub config: Arc<Config>,
    /// The login cache's accounts epoch of `config`.
    pub accounts_epoch: u64,
    pub answer_at: Instant,
    pub reply: Sender<LoginDone>,
    pub waker: Arc<Waker>,
}

/// The workers; they stop when the pool is dropped.
#[derive(Debug)]
pub(crate) struct LoginPool {
    jobs: Sender<LoginJob>,
    pub cache: Arc<LoginCache>,
}

impl LoginPool {
    pub fn start(config: &Config, threads: usize) -> std::io::Result<Self> {
        let (jobs, queue) = crossbeam_channel::unbounded::<LoginJob>();
        let cache = Arc::new(LoginCache::new(Duration::from_secs(
            config.auth.login_cache_secs,
        )));
        for index in 0..threads.max(1) {
            let queue = queue.clone();
            let cache = Arc::clone(&cache);
            std::thread::Builder::new()
                .name(format!("login-{index}"))
                .spawn(move || work(&cache, &queue))?;
        }
        Ok(Self { jobs, cache })
    }

    /// Queues a check. Each connection has at most one in flight, so the queue is
    /// bounded by the number of connections. Fails only when every worker has died;
    /// the job (with the user name for the log) comes back.
    pub fn submit(&self, job: LoginJob) -> Result<(), Box<LoginJob>> {
        self.jobs.send(job).map_err(|error| Box::new(error.0))
    }
}

fn work(cache: &LoginCache, queue: &Receiver<LoginJob>) {
    while let Ok(job) = queue.recv() {
        let LoginJob {
            token,
            connection_id,
            credentials,
            config,
            accounts_epoch,
            answer_at,
            reply,
            waker,
        } = job;
        let verified = config
            .users
            .verify(&credentials.username, credentials.password().expose());
        let outcome = match verified {
            // Acting as someone else (RFC 4616 authzid) is not supported; refused with
            // the same reply as a wrong password, after the same work.
            Ok(_) if credentials.authzid.is_some() => {
                Outcome::Rejected("authorization identity refused")
            }
            Ok(_) => {
                cache.remember(&credentials, Instant::now(), accounts_epoch);
                Outcome::Accepted
            }
            Err(VerifyError::UnknownUser) => Outcome::Rejected("unknown user"),
            Err(VerifyError::WrongPassword) => Outcome::Rejected("wrong password"),
            Err(VerifyError::PasswordTooLong) => Outcome::Rejected("password too long"),
            Err(VerifyError::Internal { reason }) => {
                tracing::error!(%reason, "cannot check a password");
                Outcome::Unavailable
            }
        };
        let done = LoginDone {
            token,
            connection_id,
            username: credentials.username.clone(),
            outcome,
            answer_at,
        };
        drop(credentials);
        if reply.send(done).is_ok() {
            let _ = waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsubame_smtp_proto::sasl::{Mechanism, ServerExchange, Step};

    fn credentials(authzid: &str, name: &str, password: &str) -> Credentials {
        let mut response = Vec::new();
        tsubame_smtp_proto::sasl::encode_base64(
            format!("{authzid}\0{name}\0{password}").as_bytes(),
            &mut response,
        );
        match ServerExchange::start(Mechanism::Plain, Some(&response)).1 {
            Step::Done(credentials) => credentials,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_cache_recalls_only_the_same_password_within_its_period() {
        let cache = LoginCache::new(Duration::from_secs(60));
        let now = Instant::now();
        let right = credentials("", "scanner", "right");
        assert!(!cache.recalls(&right, now, 0), "nothing remembered yet");
        cache.remember(&right, now, 0);
        assert!(cache.recalls(&right, now + Duration::from_secs(59), 0));
        assert!(
            !cache.recalls(&right, now + Duration::from_secs(60), 0),
            "expired"
        );
        assert!(!cache.recalls(&credentials("", "scanner", "wrong"), now, 0));
        assert!(!cache.recalls(&credentials("", "printer", "right"), now, 0));
        assert!(!cache.recalls(&credentials("boss", "scanner", "right"), now, 0));
    }

    #[test]
    fn new_accounts_forget_every_login_and_late_checks_of_the_old_ones() {
        let cache = LoginCache::new(Duration::from_secs(60));
        let now = Instant::now();
        let right = credentials("", "scanner", "right");
        cache.remember(&right, now, 0);
        assert!(cache.recalls(&right, now, 0));
        let epoch = cache.new_accounts();
        assert_eq!((epoch, cache.epoch()), (1, 1));
        assert!(!cache.recalls(&right, now, 1), "forgotten");
        assert!(!cache.recalls(&right, now, 0), "an old-epoch connection");
        // A check of the old accounts that finishes after the reload is not kept.
        cache.remember(&right, now, 0);
        assert!(!cache.recalls(&right, now, 1));
        assert!(!cache.recalls(&right, now, 0));
        // A check of the new accounts is.
        cache.remember(&right, now, 1);
        assert!(cache.recalls(&right, now, 1));
    }

    #[test]
    fn a_cache_of_zero_seconds_is_off() {
        let cache = LoginCache::new(Duration::ZERO);
        let now = Instant::now();
        let right = credentials("", "scanner", "right");
        cache.remember(&right, now, 0);
        assert!(!cache.recalls(&right, now, 0));
    }
}
