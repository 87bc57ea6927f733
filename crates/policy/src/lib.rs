//! Sending rate limits and login brute-force defence, as pure bookkeeping.
//!
//! No I/O, no threads, no clock: every call that depends on time takes `now`. The server
//! asks before it acts and reports what happened; this crate only counts and answers.
//!
//! * [`Limiter`]: messages and recipients per minute, hour and day for a [`Key`] (an
//!   authenticated user name or a client address). A transaction is either counted
//!   against every configured window or refused without being counted, with the time
//!   after which it would fit ([`Exceeded`]).
//! * [`LoginGuard`]: failed logins per client address and per user name; after a few
//!   failures every further attempt waits a growing delay, after many the key is locked
//!   out for a while ([`Decision`]).
//!
//! Connections per address are limited by the server itself, not here.
//!
//! # Memory
//!
//! Every table has a configured maximum number of keys (at most [`MAX_TRACKED_KEYS`]).
//! When a table is full, a new key evicts the least recently used one: tables never grow
//! past their maximum, never refuse a key and never panic. An evicted key starts again
//! from nothing, which is the price of the bound; [`LimiterStats::evictions`] and
//! [`LoginGuardStats::evictions`] make it visible. Per-key sizes are stated on each type.

#![forbid(unsafe_code)]

mod key;
mod limiter;
mod login;
mod lru;

#[cfg(test)]
mod tests;

pub use key::{IPV6_KEY_PREFIX_BITS, Key, MAX_USER_NAME_BYTES};
pub use limiter::{
    Counter, DEFAULT_LIMITER_MAX_KEYS, Exceeded, Limiter, LimiterStats, RateLimits,
    SLOTS_PER_WINDOW, Window,
};
pub use login::{
    DEFAULT_DELAY_AFTER_FAILURES, DEFAULT_FAILURE_WINDOW_SECS, DEFAULT_INITIAL_DELAY_MS,
    DEFAULT_LOCKOUT_AFTER_FAILURES, DEFAULT_LOCKOUT_SECS, DEFAULT_LOGIN_MAX_KEYS,
    DEFAULT_MAX_DELAY_MS, Decision, LoginGuard, LoginGuardStats, LoginPolicy,
    MAX_FAILURE_WINDOW_SECS, MAX_LOCKOUT_SECS, MAX_LOGIN_DELAY_MS,
};

/// Upper bound on any table's configured number of keys: 1,000,000. With the largest
/// per-key size (a [`Limiter`] key with all six limits and a user name of
/// [`MAX_USER_NAME_BYTES`], about 1.2 KB estimated) that is about 1.2 GB, the most a
/// relay should ever spend on this; the defaults are a tenth of it.
pub const MAX_TRACKED_KEYS: usize = 1_000_000;

/// A point in time, milliseconds since the Unix epoch, as passed in by the caller.
/// Callers pass a non-decreasing clock; a `now` earlier than one already seen is
/// treated as that later time (nothing is counted into the past).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    pub unix_ms: u64,
}

impl Timestamp {
    pub const fn from_unix_ms(unix_ms: u64) -> Self {
        Self { unix_ms }
    }

    fn plus_ms(self, duration_ms: u64) -> Self {
        Self {
            unix_ms: self.unix_ms.saturating_add(duration_ms),
        }
    }
}

/// What this crate refuses. Only configurations can be wrong: at run time every input
/// has an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid rate limits: {0}")]
    InvalidRateLimits(&'static str),
    #[error("invalid login policy: {0}")]
    InvalidLoginPolicy(&'static str),
}
