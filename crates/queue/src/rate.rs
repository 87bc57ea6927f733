//! Token bucket for a route's rate limit, driven by the time the caller passes in.

use crate::Timestamp;

#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    /// Tokens added per millisecond. Positive and finite (checked by the config).
    rate_per_ms: f64,
    /// `max(1, rate_per_second)`: a full bucket always allows one job.
    capacity: f64,
    /// In `[0, capacity]`.
    tokens: f64,
    /// The latest time seen; a `now` earlier than this (clock stepped back) adds nothing.
    refilled_at: Option<Timestamp>,
}

impl TokenBucket {
    pub(crate) fn new(rate_per_second: f64) -> Self {
        let capacity = rate_per_second.max(1.0);
        Self {
            rate_per_ms: rate_per_second / 1_000.0,
            capacity,
            tokens: capacity,
            refilled_at: None,
        }
    }

    fn refill(&mut self, now: Timestamp) {
        match self.refilled_at {
            None => self.refilled_at = Some(now),
            Some(then) if now.unix_ms > then.unix_ms => {
                let elapsed_ms = (now.unix_ms - then.unix_ms) as f64;
                self.tokens = (self.tokens + elapsed_ms * self.rate_per_ms).min(self.capacity);
                self.refilled_at = Some(now);
            }
            Some(_) => {}
        }
    }

    /// Whether a job may start now (does not take the token).
    pub(crate) fn allows(&mut self, now: Timestamp) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }

    /// Takes the token [`allows`](Self::allows) promised.
    pub(crate) fn take(&mut self) {
        debug_assert!(self.tokens >= 1.0, "token taken without being available");
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    /// When the next token will be available, if none is now.
    pub(crate) fn next_token_at(&self) -> Option<Timestamp> {
        if self.tokens >= 1.0 {
            return None;
        }
        let then = self.refilled_at?;
        let wait_ms = ((1.0 - self.tokens) / self.rate_per_ms).ceil() as u64;
        Some(Timestamp {
            unix_ms: then.unix_ms.saturating_add(wait_ms.max(1)),
        })
    }
}
