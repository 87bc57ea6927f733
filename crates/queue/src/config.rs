//! Scheduler configuration: the retry schedule, the maximum age and the per-route limits.

use crate::Error;

/// Default first retry delay: 5 minutes. Postfix's `minimal_backoff_time` is 300 s, and
/// the common greylisting default (postgrey `--delay=300`) refuses anything retried
/// sooner, so an earlier first retry mostly buys a second 4xx.
pub const DEFAULT_INITIAL_DELAY_MS: u64 = 5 * 60 * 1_000;

/// Default growth of the delay per attempt: doubling, as Postfix does.
pub const DEFAULT_BACKOFF_FACTOR: f64 = 2.0;

/// Default longest delay between attempts: 1 hour, close to Postfix's
/// `maximal_backoff_time` (4000 s), so a recipient whose server comes back is retried
/// within the hour.
pub const DEFAULT_MAX_DELAY_MS: u64 = 60 * 60 * 1_000;

/// Default maximum age of a recipient before it expires: 5 days, Postfix's
/// `maximal_queue_lifetime` and the lower bound RFC 5321 section 4.5.4.1 suggests
/// ("at least 4-5 days").
pub const DEFAULT_MAX_AGE_MS: u64 = 5 * 24 * 60 * 60 * 1_000;

/// Default jitter: every retry delay is moved by up to 10% either way, so recipients
/// deferred together (one upstream outage) do not all come back in the same millisecond.
pub const DEFAULT_JITTER_FRACTION: f64 = 0.1;

/// Upper bound on any single retry delay, whatever the schedule says: 30 days. Keeps the
/// arithmetic far from `u64` overflow and catches configuration typos.
pub const MAX_RETRY_DELAY_MS: u64 = 30 * 24 * 60 * 60 * 1_000;

/// Upper bound on the entries of an explicit schedule; it is a list typed by a human.
pub const MAX_SCHEDULE_ENTRIES: usize = 64;

/// When to retry a deferred recipient, as a function of how many attempts it has had.
#[derive(Debug, Clone, PartialEq)]
pub enum RetrySchedule {
    /// `initial_ms * factor^(attempts - 1)`, capped at `max_ms`.
    Exponential {
        initial_ms: u64,
        /// At least 1.0 (a shrinking delay is a configuration error).
        factor: f64,
        /// At least `initial_ms`.
        max_ms: u64,
    },
    /// The delay after attempt `n` (1-based) is `delays_ms[n - 1]`; the last entry
    /// repeats. Non-empty, at most [`MAX_SCHEDULE_ENTRIES`] entries.
    Explicit { delays_ms: Vec<u64> },
}

impl Default for RetrySchedule {
    fn default() -> Self {
        Self::Exponential {
            initial_ms: DEFAULT_INITIAL_DELAY_MS,
            factor: DEFAULT_BACKOFF_FACTOR,
            max_ms: DEFAULT_MAX_DELAY_MS,
        }
    }
}

impl RetrySchedule {
    /// The delay before the next attempt of a recipient that has had `attempts` attempts
    /// (`attempts` 0 is treated as 1), before jitter.
    pub fn delay_ms(&self, attempts: u32) -> u64 {
        let attempts = attempts.max(1);
        let delay_ms = match self {
            Self::Exponential {
                initial_ms,
                factor,
                max_ms,
            } => {
                // Exponents beyond 64 are past any cap; clamping keeps powi finite.
                let exponent = i32::try_from(attempts - 1).unwrap_or(i32::MAX).min(64);
                let delay = (*initial_ms as f64) * factor.powi(exponent);
                if delay >= *max_ms as f64 {
                    *max_ms
                } else {
                    delay as u64
                }
            }
            Self::Explicit { delays_ms } => {
                let position = usize::try_from(attempts - 1).unwrap_or(usize::MAX);
                delays_ms
                    .get(position)
                    .or_else(|| delays_ms.last())
                    .copied()
                    .unwrap_or(DEFAULT_INITIAL_DELAY_MS)
            }
        };
        delay_ms.min(MAX_RETRY_DELAY_MS)
    }

    fn validate(&self) -> Result<(), Error> {
        match self {
            Self::Exponential {
                initial_ms,
                factor,
                max_ms,
            } => {
                if !factor.is_finite() || *factor < 1.0 {
                    return Err(Error::InvalidConfig("retry factor must be finite and >= 1"));
                }
                if max_ms < initial_ms {
                    return Err(Error::InvalidConfig("retry max_ms must be >= initial_ms"));
                }
                if *max_ms > MAX_RETRY_DELAY_MS {
                    return Err(Error::InvalidConfig("retry max_ms above 30 days"));
                }
            }
            Self::Explicit { delays_ms } => {
                if delays_ms.is_empty() {
                    return Err(Error::InvalidConfig("explicit retry schedule is empty"));
                }
                if delays_ms.len() > MAX_SCHEDULE_ENTRIES {
                    return Err(Error::InvalidConfig("explicit retry schedule too long"));
                }
                if delays_ms.iter().any(|&delay| delay > MAX_RETRY_DELAY_MS) {
                    return Err(Error::InvalidConfig("explicit retry delay above 30 days"));
                }
            }
        }
        Ok(())
    }
}

/// Limits on one route (a destination: a smarthost, or a domain's MX set).
#[derive(Debug, Clone, PartialEq)]
pub struct RouteLimits {
    /// Most jobs (SMTP transactions) in flight at once on this route. At least 1.
    pub max_concurrent: usize,
    /// Most jobs started per second, as a token bucket holding `max(1, rate)` tokens;
    /// `None` is unlimited. Finite and positive.
    pub rate_per_second: Option<f64>,
}

impl Default for RouteLimits {
    /// 20 concurrent transactions: Postfix's `default_destination_concurrency_limit`.
    fn default() -> Self {
        Self {
            max_concurrent: 20,
            rate_per_second: None,
        }
    }
}

/// Everything the scheduler needs to know, fixed for its lifetime.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    pub retry: RetrySchedule,
    /// Age (since the message was received) after which a deferred recipient expires
    /// and becomes a permanent failure with reason "expired".
    pub max_age_ms: u64,
    /// Each retry delay is multiplied by a factor drawn uniformly from
    /// `[1 - jitter_fraction, 1 + jitter_fraction]`. In `[0, 1)`.
    pub jitter_fraction: f64,
    /// Seed of the jitter generator; the same seed and the same calls give the same
    /// schedule.
    pub seed: u64,
    /// The routes; a [`RouteId`](crate::RouteId) is an index into this list. Non-empty.
    pub routes: Vec<RouteLimits>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            retry: RetrySchedule::default(),
            max_age_ms: DEFAULT_MAX_AGE_MS,
            jitter_fraction: DEFAULT_JITTER_FRACTION,
            seed: 0,
            routes: vec![RouteLimits::default()],
        }
    }
}

impl SchedulerConfig {
    pub(crate) fn validate(&self) -> Result<(), Error> {
        self.retry.validate()?;
        if !(0.0..1.0).contains(&self.jitter_fraction) {
            return Err(Error::InvalidConfig("jitter_fraction must be in [0, 1)"));
        }
        if self.max_age_ms == 0 {
            return Err(Error::InvalidConfig("max_age_ms must be positive"));
        }
        if self.routes.is_empty() {
            return Err(Error::InvalidConfig("no routes"));
        }
        if u32::try_from(self.routes.len()).is_err() {
            return Err(Error::InvalidConfig("more routes than a RouteId can name"));
        }
        for route in &self.routes {
            validate_route(route)?;
        }
        Ok(())
    }
}

impl RouteLimits {
    /// Checks the limits as [`Scheduler::new`](crate::Scheduler::new) and
    /// [`Scheduler::add_route`](crate::Scheduler::add_route) do.
    pub fn validate(&self) -> Result<(), Error> {
        validate_route(self)
    }
}

/// Checks one route's limits (at start, and for a route added by a reload).
fn validate_route(route: &RouteLimits) -> Result<(), Error> {
    if route.max_concurrent == 0 {
        return Err(Error::InvalidConfig("route max_concurrent must be >= 1"));
    }
    if let Some(rate) = route.rate_per_second
        && (!rate.is_finite() || rate <= 0.0)
    {
        return Err(Error::InvalidConfig(
            "route rate_per_second must be finite and positive",
        ));
    }
    Ok(())
}
