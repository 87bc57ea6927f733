//! Failed logins per client address and per user name: growing delays, then a lockout.
//!
//! # Counting
//!
//! Each key keeps a failure count, the time of its last failure and, once locked, the
//! end of its lockout: 40 bytes, so memory is O(keys) whatever the attack rate. "Within a
//! window" means failures with no quiet gap longer than `failure_window_secs` between
//! them (a lockout counts as not quiet): the count returns to zero only after a whole
//! window without failures. That is stricter than a fixed window from the first failure,
//! which an attacker pacing just under `N` failures per window would never trip, and
//! needs no list of timestamps.
//!
//! # Decisions
//!
//! With fewer than `delay_after_failures` (N) failures an attempt is allowed at once.
//! From N failures on, the server waits `initial_delay_ms * 2^(failures - N)`, capped at
//! `max_delay_ms`, before it answers the attempt. On reaching `lockout_after_failures`
//! (M) failures the key is locked for `lockout_secs`: attempts are refused at once
//! (`454 4.7.0`) without checking the password. After the lockout the count is still M,
//! so the key gets the longest delay and its next failure within the window locks it
//! again.
//!
//! An attempt is judged by both its address and its user name, the stricter wins: the
//! address catches one client guessing many users (password spraying), the user name
//! many clients guessing one user (a botnet).
//!
//! # Success
//!
//! A successful login forgets the user name's failures: the right password was given, so
//! whatever failed before was the user mistyping, or a guesser who has now lost nothing
//! by being reset (they would need the password to do it). The address's failures are
//! *not* forgotten: otherwise anyone holding one valid account (a customer of the relay,
//! or a bot that has phished one) could interleave a good login between guesses and
//! spray every other user's password from one address without ever slowing down. The
//! address's count fades by itself after a quiet window.
//!
//! The delay slows each attempt, not a client: a client with several connections can
//! wait out several delays at once, so the server's connection limit per address is
//! what makes the delay count, and the lockout is what bounds the total.

use std::net::IpAddr;
use std::time::Duration;

use crate::lru::LruMap;
use crate::{Error, Key, MAX_TRACKED_KEYS, Timestamp};

/// Default failures allowed without delay: 5, enough for a user who mistypes a few times
/// or whose client retries an old password; the figure most login throttles use.
pub const DEFAULT_DELAY_AFTER_FAILURES: u32 = 5;

/// Default failures before a lockout: 20. With the default delays an attacker needs
/// about 10 minutes to get there from the fifth failure.
pub const DEFAULT_LOCKOUT_AFTER_FAILURES: u32 = 20;

/// Default first delay: 1 second, doubled with each further failure.
pub const DEFAULT_INITIAL_DELAY_MS: u64 = 1_000;

/// Default longest delay: 60 seconds.
pub const DEFAULT_MAX_DELAY_MS: u64 = 60_000;

/// Default lockout: 15 minutes.
pub const DEFAULT_LOCKOUT_SECS: u32 = 15 * 60;

/// Default quiet time after which failures are forgotten: 15 minutes.
pub const DEFAULT_FAILURE_WINDOW_SECS: u32 = 15 * 60;

/// Default maximum number of addresses, and separately of user names, tracked: 100,000
/// each, at most about 130 bytes per address and 130 + 2 × 256 bytes per user name,
/// so under 80 MB in all when both tables are full of the longest names.
pub const DEFAULT_LOGIN_MAX_KEYS: usize = 100_000;

/// Upper bound on a configured delay: 2 minutes, the shortest reply timeout a client
/// keeps (RFC 5321 section 4.5.3.2.4, "DATA Initiation: 2 minutes"); a longer delay
/// turns into a client timeout rather than a slower guesser.
pub const MAX_LOGIN_DELAY_MS: u64 = 2 * 60 * 1_000;

/// Upper bound on a configured lockout: 1 day; longer is a ban, which belongs in access
/// rules an operator can see and lift.
pub const MAX_LOCKOUT_SECS: u32 = 24 * 60 * 60;

/// Upper bound on the configured quiet window: 1 day.
pub const MAX_FAILURE_WINDOW_SECS: u32 = 24 * 60 * 60;

/// Brute-force defence settings; also the configuration's `[login_guard]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoginPolicy {
    /// N: failures after which every attempt is delayed. At least 1.
    pub delay_after_failures: u32,
    /// M: failures after which the key is locked out. At least 1; at or below N means
    /// lockouts without delays.
    pub lockout_after_failures: u32,
    /// The first delay. At least 1, at most `max_delay_ms`.
    pub initial_delay_ms: u64,
    /// At most [`MAX_LOGIN_DELAY_MS`].
    pub max_delay_ms: u64,
    /// At least 1, at most [`MAX_LOCKOUT_SECS`].
    pub lockout_secs: u32,
    /// At least 1, at most [`MAX_FAILURE_WINDOW_SECS`].
    pub failure_window_secs: u32,
    /// Client addresses tracked; between 1 and [`MAX_TRACKED_KEYS`].
    pub max_tracked_addresses: usize,
    /// User names tracked; between 1 and [`MAX_TRACKED_KEYS`].
    pub max_tracked_users: usize,
}

impl Default for LoginPolicy {
    fn default() -> Self {
        Self {
            delay_after_failures: DEFAULT_DELAY_AFTER_FAILURES,
            lockout_after_failures: DEFAULT_LOCKOUT_AFTER_FAILURES,
            initial_delay_ms: DEFAULT_INITIAL_DELAY_MS,
            max_delay_ms: DEFAULT_MAX_DELAY_MS,
            lockout_secs: DEFAULT_LOCKOUT_SECS,
            failure_window_secs: DEFAULT_FAILURE_WINDOW_SECS,
            max_tracked_addresses: DEFAULT_LOGIN_MAX_KEYS,
            max_tracked_users: DEFAULT_LOGIN_MAX_KEYS,
        }
    }
}

impl LoginPolicy {
    fn validate(&self) -> Result<(), Error> {
        let checks: [(bool, &'static str); 8] = [
            (
                self.delay_after_failures >= 1,
                "delay_after_failures must be at least 1",
            ),
            (
                self.lockout_after_failures >= 1,
                "lockout_after_failures must be at least 1",
            ),
            (
                self.initial_delay_ms >= 1,
                "initial_delay_ms must be at least 1",
            ),
            (
                self.initial_delay_ms <= self.max_delay_ms,
                "initial_delay_ms must not exceed max_delay_ms",
            ),
            (
                self.max_delay_ms <= MAX_LOGIN_DELAY_MS,
                "max_delay_ms must not exceed 2 minutes (a client's reply timeout)",
            ),
            (
                (1..=MAX_LOCKOUT_SECS).contains(&self.lockout_secs),
                "lockout_secs must be between 1 s and 1 day",
            ),
            (
                (1..=MAX_FAILURE_WINDOW_SECS).contains(&self.failure_window_secs),
                "failure_window_secs must be between 1 s and 1 day",
            ),
            (
                (1..=MAX_TRACKED_KEYS).contains(&self.max_tracked_addresses)
                    && (1..=MAX_TRACKED_KEYS).contains(&self.max_tracked_users),
                "tracked keys must be between 1 and 1,000,000",
            ),
        ];
        match checks.into_iter().find(|(ok, _)| !ok) {
            Some((_, reason)) => Err(Error::InvalidLoginPolicy(reason)),
            None => Ok(()),
        }
    }
}

/// What the server does with a login attempt, asked before it checks the password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Check it and answer at once.
    Allow,
    /// Check it, but answer only after this long (whatever the outcome, so that the
    /// delay does not tell a guesser which attempts failed).
    Delay(Duration),
    /// Refuse it at once without checking the password (`454 4.7.0`), until this time.
    Locked { until: Timestamp },
}

/// Counts of a [`LoginGuard`] for monitoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginGuardStats {
    pub tracked_addresses: usize,
    pub tracked_users: usize,
    /// Keys pushed out of either table, since creation, because it was full.
    pub evictions: u64,
}

/// One key's failures.
#[derive(Debug, Clone, Copy)]
struct Failures {
    /// At least 1 while tracked.
    count: u32,
    last_failure: Timestamp,
    /// Set when `count` reached the lockout threshold; the lockout is over once `now`
    /// reaches it.
    locked_until: Option<Timestamp>,
}

impl Failures {
    /// The latest of the last failure and the lockout's end: quiet time counts from here.
    fn last_activity(&self) -> Timestamp {
        self.locked_until
            .map_or(self.last_failure, |until| until.max(self.last_failure))
    }

    fn forgotten(&self, policy: &LoginPolicy, now: Timestamp) -> bool {
        let window_ms = u64::from(policy.failure_window_secs) * 1_000;
        now > self.last_activity().plus_ms(window_ms)
    }

    fn decision(&self, policy: &LoginPolicy, now: Timestamp) -> Decision {
        if let Some(until) = self.locked_until.filter(|&until| now < until) {
            return Decision::Locked { until };
        }
        if self.forgotten(policy, now) || self.count < policy.delay_after_failures {
            return Decision::Allow;
        }
        let doublings = self.count - policy.delay_after_failures;
        // 2^doublings overflows past 63; any factor that large is past the cap.
        let delay_ms = 1u64
            .checked_shl(doublings)
            .and_then(|factor| policy.initial_delay_ms.checked_mul(factor))
            .map_or(policy.max_delay_ms, |ms| ms.min(policy.max_delay_ms));
        Decision::Delay(Duration::from_millis(delay_ms))
    }

    fn record_failure(&mut self, policy: &LoginPolicy, now: Timestamp) {
        if self.forgotten(policy, now) {
            *self = Self {
                count: 0,
                last_failure: now,
                locked_until: None,
            };
        }
        self.count = self.count.saturating_add(1);
        self.last_failure = self.last_failure.max(now);
        let locked = self.locked_until.is_some_and(|until| now < until);
        if self.count >= policy.lockout_after_failures && !locked {
            self.locked_until = Some(now.plus_ms(u64::from(policy.lockout_secs) * 1_000));
        }
    }
}

/// The stricter of two decisions: a lockout (the later one) over a delay (the longer one)
/// over allowing.
fn stricter(a: Decision, b: Decision) -> Decision {
    match (a, b) {
        (Decision::Locked { until: x }, Decision::Locked { until: y }) => {
            Decision::Locked { until: x.max(y) }
        }
        (locked @ Decision::Locked { .. }, _) | (_, locked @ Decision::Locked { .. }) => locked,
        (Decision::Delay(x), Decision::Delay(y)) => Decision::Delay(x.max(y)),
        (delay @ Decision::Delay(_), Decision::Allow)
        | (Decision::Allow, delay @ Decision::Delay(_)) => delay,
        (Decision::Allow, Decision::Allow) => Decision::Allow,
    }
}

/// Brute-force defence for logins (see the module documentation).
///
/// Memory: at most `max_tracked_addresses` + `max_tracked_users` keys, each a hash-table
/// slot and list node with its 40-byte count (about 130 bytes) plus, for a user name,
/// the name twice (at most 2 × [`MAX_USER_NAME_BYTES`](crate::MAX_USER_NAME_BYTES)).
/// Addresses and user names have separate tables so that a client spraying random user
/// names evicts only user names, never the addresses being slowed down.
#[derive(Debug)]
pub struct LoginGuard {
    policy: LoginPolicy,
    addresses: LruMap<Key, Failures>,
    users: LruMap<Key, Failures>,
    /// The latest `now` seen; earlier times are treated as this one.
    latest: Timestamp,
}

impl LoginGuard {
    pub fn new(policy: LoginPolicy) -> Result<Self, Error> {
        policy.validate()?;
        Ok(Self {
            policy,
            addresses: LruMap::new(policy.max_tracked_addresses),
            users: LruMap::new(policy.max_tracked_users),
            latest: Timestamp::from_unix_ms(0),
        })
    }

    /// What to do with a login attempt from `address` as `user` (`None` when the
    /// client's message carried no usable name). Tracks no new key.
    pub fn before_attempt(&self, address: IpAddr, user: Option<&str>, now: Timestamp) -> Decision {
        let now = now.max(self.latest);
        let by_address = self
            .addresses
            .peek(&Key::ip(address))
            .map_or(Decision::Allow, |failures| {
                failures.decision(&self.policy, now)
            });
        let by_user = user
            .and_then(|name| self.users.peek(&Key::user(name)))
            .map_or(Decision::Allow, |failures| {
                failures.decision(&self.policy, now)
            });
        stricter(by_address, by_user)
    }

    /// Records a failed attempt (wrong password, unknown user, malformed credentials)
    /// against the address and the user name; returns the decision for the next attempt.
    pub fn after_failure(
        &mut self,
        address: IpAddr,
        user: Option<&str>,
        now: Timestamp,
    ) -> Decision {
        let now = self.observe(now);
        let policy = self.policy;
        let fresh = || Failures {
            count: 0,
            last_failure: now,
            locked_until: None,
        };
        let by_address = self.addresses.entry(&Key::ip(address), fresh);
        by_address.record_failure(&policy, now);
        let mut decision = by_address.decision(&policy, now);
        if let Some(name) = user {
            let by_user = self.users.entry(&Key::user(name), fresh);
            by_user.record_failure(&policy, now);
            decision = stricter(decision, by_user.decision(&policy, now));
        }
        decision
    }

    /// Records a successful login: forgets the user name's failures, keeps the address's
    /// (see the module documentation for why).
    pub fn after_success(&mut self, _address: IpAddr, user: &str, now: Timestamp) {
        self.observe(now);
        self.users.remove(&Key::user(user));
    }

    /// Forgets up to `max_entries` least recently used keys of each table whose failures
    /// are forgotten anyway; returns how many. Optional: full tables evict by themselves.
    pub fn purge_idle(&mut self, now: Timestamp, max_entries: usize) -> usize {
        let now = self.observe(now);
        let policy = self.policy;
        let idle = |failures: &Failures| failures.forgotten(&policy, now);
        self.addresses.remove_idle_tail(max_entries, idle)
            + self.users.remove_idle_tail(max_entries, idle)
    }

    pub fn stats(&self) -> LoginGuardStats {
        LoginGuardStats {
            tracked_addresses: self.addresses.len(),
            tracked_users: self.users.len(),
            evictions: self
                .addresses
                .evictions()
                .saturating_add(self.users.evictions()),
        }
    }

    /// Checks both tables' structure and bounds, and that every tracked key that reached
    /// the lockout threshold has a lockout.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.addresses.check_invariants()?;
        self.users.check_invariants()?;
        for failures in self.addresses.values().chain(self.users.values()) {
            if failures.count == 0 {
                return Err("a tracked key with no failures".to_owned());
            }
            if failures.count >= self.policy.lockout_after_failures
                && failures.locked_until.is_none()
            {
                return Err(format!("{} failures and no lockout", failures.count));
            }
            if failures.last_failure > self.latest {
                return Err("a failure in the future".to_owned());
            }
        }
        Ok(())
    }

    fn observe(&mut self, now: Timestamp) -> Timestamp {
        self.latest = self.latest.max(now);
        self.latest
    }
}
