//! Sending rate limits per logged-in user and per client address, shared by every event
//! loop: `[rate_limits]` applied with [`tsubame_policy::Limiter`].
//!
//! A session asks at MAIL (one more message), at each RCPT (the recipients so far plus
//! this one), and counts the message when its content is complete, just before it is
//! spooled. Only that last step counts; the first two are pure checks, so a refused or
//! abandoned transaction costs its sender nothing.

use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tsubame_config::RateLimitConfig;
use tsubame_policy::{Counter, Exceeded, Key, Limiter, Timestamp, Window};
use tsubame_smtp_proto::reply::{EnhancedCode, Reply};

/// The limiters of `[rate_limits]`; a table with no limit set has none.
#[derive(Debug)]
pub struct RatePolicy {
    per_user: Option<Mutex<Limiter>>,
    per_client: Option<Mutex<Limiter>>,
}

/// Where in the transaction a limit is checked; decides the reply code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Mail,
    Recipient,
    Content,
}

impl RatePolicy {
    pub fn new(config: &RateLimitConfig) -> Result<Self, tsubame_policy::Error> {
        let limiter = |table: &tsubame_config::RateLimitTable| {
            (!table.is_empty())
                .then(|| Limiter::new(*table, config.max_tracked_keys).map(Mutex::new))
                .transpose()
        };
        Ok(Self {
            per_user: limiter(&config.per_user)?,
            per_client: limiter(&config.per_client)?,
        })
    }

    /// No limits at all.
    pub fn unlimited() -> Self {
        Self {
            per_user: None,
            per_client: None,
        }
    }

    /// Would one more message with `recipients` recipients fit now? Counts nothing.
    pub fn check(
        &self,
        client: IpAddr,
        user: Option<&str>,
        recipients: u32,
        stage: Stage,
        now_unix_ms: u64,
    ) -> Result<(), Reply> {
        let now = Timestamp::from_unix_ms(now_unix_ms);
        if let (Some(limiter), Some(name)) = (&self.per_user, user) {
            lock(limiter)
                .check_recipient(&Key::user(name), recipients, now)
                .map_err(|exceeded| refusal(exceeded, stage, "your login"))?;
        }
        if let Some(limiter) = &self.per_client {
            lock(limiter)
                .check_recipient(&Key::ip(client), recipients, now)
                .map_err(|exceeded| refusal(exceeded, stage, "your address"))?;
        }
        Ok(())
    }

    /// Counts a complete message against every limit, or refuses it and counts nothing.
    pub fn count_message(
        &self,
        client: IpAddr,
        user: Option<&str>,
        recipients: u32,
        now_unix_ms: u64,
    ) -> Result<(), Reply> {
        if self.per_user.is_none() && self.per_client.is_none() {
            return Ok(());
        }
        let now = Timestamp::from_unix_ms(now_unix_ms);
        // Both locks at once (always user first), so a message refused by one table is
        // not counted by the other.
        let mut by_user = self
            .per_user
            .as_ref()
            .zip(user)
            .map(|(limiter, name)| (lock(limiter), Key::user(name)));
        let mut by_client = self
            .per_client
            .as_ref()
            .map(|limiter| (lock(limiter), Key::ip(client)));
        if let Some((limiter, key)) = &by_user {
            limiter
                .check_recipient(key, recipients, now)
                .map_err(|exceeded| refusal(exceeded, Stage::Content, "your login"))?;
        }
        if let Some((limiter, key)) = &mut by_client {
            limiter
                .check_message(key, recipients, now)
                .map_err(|exceeded| refusal(exceeded, Stage::Content, "your address"))?;
        }
        if let Some((limiter, key)) = &mut by_user {
            // Checked above under the same lock: this cannot refuse.
            limiter
                .check_message(key, recipients, now)
                .map_err(|exceeded| refusal(exceeded, Stage::Content, "your login"))?;
        }
        Ok(())
    }
}

fn lock(limiter: &Mutex<Limiter>) -> MutexGuard<'_, Limiter> {
    limiter.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `451 4.7.1` (or `452 4.7.1` at RCPT) with the limit and when to try again; `452 4.5.3`
/// when a transaction alone has more recipients than a limit allows.
fn refusal(exceeded: Exceeded, stage: Stage, whose: &str) -> Reply {
    let window = match exceeded.window {
        Window::Minute => "minute",
        Window::Hour => "hour",
        Window::Day => "day",
    };
    let counted = match exceeded.counter {
        Counter::Messages => "messages",
        Counter::Recipients => "recipients",
    };
    let code = if stage == Stage::Recipient { 452 } else { 451 };
    match exceeded.retry_after_secs {
        Some(seconds) => Reply::owned(
            code,
            Some(EnhancedCode::new(4, 7, 1)),
            format!(
                "Rate limit for {whose} reached: {} {counted} per {window}; try again in {seconds} s",
                exceeded.limit
            ),
        ),
        None => Reply::owned(
            452,
            Some(EnhancedCode::new(4, 5, 3)),
            format!(
                "Too many recipients for the rate limit of {whose}: at most {} per {window}",
                exceeded.limit
            ),
        ),
    }
}
