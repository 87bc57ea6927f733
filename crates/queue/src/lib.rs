//! The delivery scheduler: which (message, recipient) pairs are waiting, which may be
//! attempted now on which route, and when the deferred ones come back.
//!
//! No I/O, no threads, no clock: every call that depends on time takes `now`, and jitter
//! comes from a generator seeded by the configuration, so a sequence of calls always
//! produces the same schedule. The caller owns the spool: at start it rebuilds the
//! scheduler from the spool ([`Scheduler::insert_recovered`]), journals every outcome
//! it reports, and reclaims a message once [`Event::MessageDone`] says all its
//! recipients are final.
//!
//! # Life of a recipient
//!
//! Every pending recipient is in exactly one state:
//!
//! * **ready**: in its route's ready queue, waiting for a concurrency slot and a rate
//!   token;
//! * **in flight**: part of a [`Job`] handed out by [`Scheduler::next_job`];
//! * **deferred**: waiting in the retry heap for its due time;
//! * **held**: its message is on hold ([`Scheduler::hold`]); neither attempted nor
//!   expired until released.
//!
//! [`Scheduler::complete`] turns an in-flight recipient into a final one (delivered or
//! failed) or a deferred one; [`Scheduler::advance`] turns due deferred recipients into
//! ready ones, and deferred recipients past the maximum age into expired (final) ones.
//!
//! # Jobs
//!
//! A [`Job`] is one SMTP transaction: one message, one route, one or more of the
//! message's recipients on that route. Concurrency and rate limits count jobs, not
//! recipients. The job's slot is freed when its last recipient is completed.
//!
//! # Data structures and bounds
//!
//! Ready queues are `VecDeque`s per route and the retry timers a `BinaryHeap`, both with
//! lazy deletion: an entry carries the recipient's generation at the time it was queued
//! and is skipped if the recipient has moved on since. Stale entries are dropped when
//! they reach the front, and a queue is compacted when its stale entries outnumber its
//! live ones, so memory stays proportional to the pending recipients. The number of
//! messages is bounded by the spool, recipients per message by
//! [`MAX_RECIPIENTS_PER_MESSAGE`], jobs in flight by the routes' `max_concurrent`.

#![forbid(unsafe_code)]

mod config;
mod rate;
mod rng;

#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

pub use config::{
    DEFAULT_BACKOFF_FACTOR, DEFAULT_INITIAL_DELAY_MS, DEFAULT_JITTER_FRACTION, DEFAULT_MAX_AGE_MS,
    DEFAULT_MAX_DELAY_MS, MAX_RETRY_DELAY_MS, MAX_SCHEDULE_ENTRIES, RetrySchedule, RouteLimits,
    SchedulerConfig,
};
use rate::TokenBucket;
use rng::SplitMix64;

/// Most recipients one message may have in the scheduler. Far above the server's
/// `max_recipients` (default 1000); it exists so that one corrupt spool record cannot
/// make recovery allocate without bound.
pub const MAX_RECIPIENTS_PER_MESSAGE: usize = 100_000;

/// Stale queue entries tolerated before compaction, beyond "as many as live ones"; keeps
/// small queues from being compacted over and over.
const COMPACTION_SLACK_ENTRIES: usize = 1_024;

/// A point in time, milliseconds since the Unix epoch, as passed in by the caller.
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

/// A message, by its spool message id value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageKey(pub u64);

/// A recipient, by its index in the message's recipient list (as in the spool's
/// recipient outcome records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecipientIndex(pub u32);

/// A route, by its index in [`SchedulerConfig::routes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteId(pub u32);

/// A job handed out by [`Scheduler::next_job`]; unique for the scheduler's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub u64);

/// How one recipient's attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the recipient is done.
    Delivered,
    /// 4xx, connection failure, TLS failure, timeout: try again later.
    Deferred,
    /// 5xx: permanent failure; the caller bounces.
    Failed,
}

/// Something the caller must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The recipient was deferred past the maximum age: a permanent failure with reason
    /// "expired"; the caller journals it and bounces.
    Expired {
        message: MessageKey,
        recipient: RecipientIndex,
    },
    /// Every recipient of the message is final; the scheduler has forgotten it. The
    /// caller writes the message-done journal record and may reclaim the space.
    /// Reported exactly once per message, never for one removed by
    /// [`Scheduler::remove_message`].
    MessageDone { message: MessageKey },
}

/// One recipient of a [`Job`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobRecipient {
    pub recipient: RecipientIndex,
    /// 1 for the first attempt of this recipient.
    pub attempt: u32,
}

/// One SMTP transaction to attempt: a message and some of its recipients on one route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: JobId,
    pub message: MessageKey,
    pub route: RouteId,
    /// Non-empty, distinct, in the order they were queued (the first) then by index.
    pub recipients: Vec<JobRecipient>,
}

/// A recipient handed to [`Scheduler::insert_recovered`]: one that recovery found not
/// yet final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveredRecipient {
    pub recipient: RecipientIndex,
    pub route: RouteId,
    /// Attempts already made (from the journal's deferral records).
    pub attempts: u32,
    /// When to try again; `None` or a time not after `now` means ready now.
    pub next_attempt_at: Option<Timestamp>,
}

/// What the scheduler refuses. Every variant names what was wrong; none leaves the
/// scheduler changed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("invalid scheduler configuration: {0}")]
    InvalidConfig(&'static str),
    #[error("unknown route {0:?}")]
    UnknownRoute(RouteId),
    #[error("unknown message {0:?}")]
    UnknownMessage(MessageKey),
    #[error("message {0:?} is already scheduled")]
    DuplicateMessage(MessageKey),
    #[error("message {0:?} has no recipients")]
    NoRecipients(MessageKey),
    #[error("message {message:?} has {count} recipients, more than {MAX_RECIPIENTS_PER_MESSAGE}")]
    TooManyRecipients { message: MessageKey, count: usize },
    #[error("message {message:?} lists recipient {recipient:?} twice")]
    DuplicateRecipient {
        message: MessageKey,
        recipient: RecipientIndex,
    },
    #[error("unknown job {0:?}")]
    UnknownJob(JobId),
    #[error("recipient {recipient:?} is not part of job {job:?}")]
    RecipientNotInJob {
        job: JobId,
        recipient: RecipientIndex,
    },
    #[error("recipient {recipient:?} of job {job:?} was already completed")]
    AlreadyCompleted {
        job: JobId,
        recipient: RecipientIndex,
    },
}

/// Where a pending recipient is. Final recipients keep a `Final` marker so that their
/// index stays taken and counts are exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecipientState {
    Ready,
    InFlight(JobId),
    Deferred {
        due: Timestamp,
    },
    /// `due` is where it was before the hold: `None` for ready.
    Held {
        due: Option<Timestamp>,
    },
    Final,
}

#[derive(Debug)]
struct RecipientEntry {
    index: RecipientIndex,
    route: RouteId,
    attempts: u32,
    /// Bumped on every state change; queue entries with an older generation are stale.
    generation: u64,
    state: RecipientState,
}

#[derive(Debug)]
struct MessageEntry {
    /// After `received_at + max_age_ms` a deferred recipient expires.
    expires_at: Timestamp,
    held: bool,
    /// Sorted by index, distinct; looked up by binary search.
    recipients: Vec<RecipientEntry>,
    /// Recipients not in `Final`; the message is done when this reaches 0.
    unfinished: usize,
}

impl MessageEntry {
    fn recipient_mut(&mut self, index: RecipientIndex) -> Option<&mut RecipientEntry> {
        let position = self
            .recipients
            .binary_search_by_key(&index, |entry| entry.index)
            .ok()?;
        self.recipients.get_mut(position)
    }
}

/// A ready-queue or retry-heap entry; valid while the recipient's generation matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct QueueEntry {
    message: MessageKey,
    recipient: RecipientIndex,
    generation: u64,
}

#[derive(Debug)]
struct RouteState {
    limits: RouteLimits,
    /// May hold stale entries; `ready_live` counts the valid ones.
    ready: VecDeque<QueueEntry>,
    ready_live: usize,
    /// Jobs in flight; never above `limits.max_concurrent`.
    in_flight_jobs: usize,
    bucket: Option<TokenBucket>,
}

#[derive(Debug)]
struct JobEntry {
    message: MessageKey,
    route: RouteId,
    /// Recipient and whether it has been completed.
    recipients: Vec<(RecipientIndex, bool)>,
    remaining: usize,
}

/// Counts of recipients by state, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub ready: usize,
    pub in_flight: usize,
    pub deferred: usize,
    pub held: usize,
}

/// The scheduler. See the crate documentation.
#[derive(Debug)]
pub struct Scheduler {
    retry: RetrySchedule,
    max_age_ms: u64,
    jitter_fraction: f64,
    rng: SplitMix64,
    routes: Vec<RouteState>,
    messages: HashMap<MessageKey, MessageEntry>,
    /// Min-heap on due time; may hold stale entries, `deferred_live` counts valid ones.
    retries: BinaryHeap<Reverse<(Timestamp, QueueEntry)>>,
    jobs: HashMap<JobId, JobEntry>,
    next_job_id: u64,
    next_generation: u64,
    counts: Counts,
}

impl Scheduler {
    /// Checks the configuration and builds an empty scheduler.
    pub fn new(config: SchedulerConfig) -> Result<Self, Error> {
        config.validate()?;
        let routes = config
            .routes
            .into_iter()
            .map(|limits| RouteState {
                bucket: limits.rate_per_second.map(TokenBucket::new),
                limits,
                ready: VecDeque::new(),
                ready_live: 0,
                in_flight_jobs: 0,
            })
            .collect();
        Ok(Self {
            retry: config.retry,
            max_age_ms: config.max_age_ms,
            jitter_fraction: config.jitter_fraction,
            rng: SplitMix64::new(config.seed),
            routes,
            messages: HashMap::new(),
            retries: BinaryHeap::new(),
            jobs: HashMap::new(),
            next_job_id: 0,
            next_generation: 0,
            counts: Counts::default(),
        })
    }

    /// Schedules a newly accepted message; all its recipients are ready now.
    pub fn insert(
        &mut self,
        message: MessageKey,
        received_at: Timestamp,
        recipients: &[(RecipientIndex, RouteId)],
        now: Timestamp,
    ) -> Result<(), Error> {
        let recovered: Vec<RecoveredRecipient> = recipients
            .iter()
            .map(|&(recipient, route)| RecoveredRecipient {
                recipient,
                route,
                attempts: 0,
                next_attempt_at: None,
            })
            .collect();
        self.insert_recovered(message, received_at, &recovered, now)
    }

    /// Schedules a message found in the spool at start, with the recipients that are not
    /// yet final. A recipient whose `next_attempt_at` is in the future is deferred until
    /// then (or until the message expires, whichever is first); the rest are ready.
    pub fn insert_recovered(
        &mut self,
        message: MessageKey,
        received_at: Timestamp,
        recipients: &[RecoveredRecipient],
        now: Timestamp,
    ) -> Result<(), Error> {
        if self.messages.contains_key(&message) {
            return Err(Error::DuplicateMessage(message));
        }
        if recipients.is_empty() {
            return Err(Error::NoRecipients(message));
        }
        if recipients.len() > MAX_RECIPIENTS_PER_MESSAGE {
            return Err(Error::TooManyRecipients {
                message,
                count: recipients.len(),
            });
        }
        if let Some(bad) = recipients.iter().find(|r| !self.route_exists(r.route)) {
            return Err(Error::UnknownRoute(bad.route));
        }
        let mut sorted: Vec<RecoveredRecipient> = recipients.to_vec();
        sorted.sort_by_key(|r| r.recipient);
        if let Some(pair) = sorted.windows(2).find(|w| w[0].recipient == w[1].recipient) {
            return Err(Error::DuplicateRecipient {
                message,
                recipient: pair[0].recipient,
            });
        }

        let expires_at = received_at.plus_ms(self.max_age_ms);
        let mut entry = MessageEntry {
            expires_at,
            held: false,
            recipients: Vec::with_capacity(sorted.len()),
            unfinished: sorted.len(),
        };
        for recovered in &sorted {
            let generation = self.bump_generation();
            entry.recipients.push(RecipientEntry {
                index: recovered.recipient,
                route: recovered.route,
                attempts: recovered.attempts,
                generation,
                state: RecipientState::Final, // placed below
            });
        }
        self.messages.insert(message, entry);
        for recovered in &sorted {
            match recovered.next_attempt_at {
                Some(due) if due > now => {
                    self.place_deferred(message, recovered.recipient, due.min(expires_at))
                }
                _ => self.place_ready(message, recovered.recipient),
            }
        }
        Ok(())
    }

    /// Hands out the next job on `route`: the oldest ready recipient there plus up to
    /// `max_recipients - 1` more ready recipients of the same message on the same route
    /// (`max_recipients` 0 counts as 1). `None` if nothing is ready, the route is at its
    /// concurrency limit, or its rate limit has no token now (see
    /// [`next_wakeup`](Self::next_wakeup)).
    ///
    /// Does not move due retries; call [`advance`](Self::advance) first.
    pub fn next_job(
        &mut self,
        route: RouteId,
        now: Timestamp,
        max_recipients: usize,
    ) -> Result<Option<Job>, Error> {
        let route_position = self.route_position(route)?;
        let Some(route_state) = self.routes.get_mut(route_position) else {
            return Err(Error::UnknownRoute(route));
        };
        if route_state.ready_live == 0
            || route_state.in_flight_jobs >= route_state.limits.max_concurrent
        {
            return Ok(None);
        }
        if let Some(bucket) = route_state.bucket.as_mut()
            && !bucket.allows(now)
        {
            return Ok(None);
        }
        // Find the first valid entry, dropping stale ones on the way.
        let first = loop {
            let Some(candidate) = route_state.ready.pop_front() else {
                // ready_live > 0 promised a valid entry.
                debug_assert!(false, "ready_live out of step with the ready queue");
                return Ok(None);
            };
            let valid = recipient_in(&self.messages, candidate.message, candidate.recipient)
                .is_some_and(|r| {
                    r.generation == candidate.generation && r.state == RecipientState::Ready
                });
            if valid {
                break candidate;
            }
        };

        let id = JobId(self.next_job_id);
        self.next_job_id += 1;
        let Some(message_entry) = self.messages.get_mut(&first.message) else {
            return Ok(None);
        };
        let max_recipients = max_recipients.max(1);
        let mut chosen = vec![first.recipient];
        for recipient in &message_entry.recipients {
            if chosen.len() >= max_recipients {
                break;
            }
            if recipient.route == route
                && recipient.state == RecipientState::Ready
                && recipient.index != first.recipient
            {
                chosen.push(recipient.index);
            }
        }
        let mut job_recipients = Vec::with_capacity(chosen.len());
        for &index in &chosen {
            self.next_generation += 1;
            let generation = self.next_generation;
            let Some(recipient) = message_entry.recipient_mut(index) else {
                continue;
            };
            recipient.state = RecipientState::InFlight(id);
            recipient.generation = generation;
            recipient.attempts = recipient.attempts.saturating_add(1);
            job_recipients.push(JobRecipient {
                recipient: index,
                attempt: recipient.attempts,
            });
        }
        let count = job_recipients.len();
        route_state.ready_live -= count;
        route_state.in_flight_jobs += 1;
        if let Some(bucket) = route_state.bucket.as_mut() {
            bucket.take();
        }
        self.counts.ready -= count;
        self.counts.in_flight += count;
        self.jobs.insert(
            id,
            JobEntry {
                message: first.message,
                route,
                recipients: chosen.iter().map(|&index| (index, false)).collect(),
                remaining: count,
            },
        );
        self.compact_ready_queues();
        Ok(Some(Job {
            id,
            message: first.message,
            route,
            recipients: job_recipients,
        }))
    }

    /// Records how one recipient of a job fared. The job's concurrency slot is freed
    /// when its last recipient is completed. Returns [`Event::Expired`] if a deferral
    /// comes after the message's maximum age, and [`Event::MessageDone`] if this was the
    /// message's last unfinished recipient.
    ///
    /// If the message was removed while the job was in flight, the outcome is accepted
    /// and ignored.
    pub fn complete(
        &mut self,
        job: JobId,
        recipient: RecipientIndex,
        outcome: Outcome,
        now: Timestamp,
    ) -> Result<Vec<Event>, Error> {
        let Some(job_entry) = self.jobs.get_mut(&job) else {
            return Err(Error::UnknownJob(job));
        };
        let Some(slot) = job_entry
            .recipients
            .iter_mut()
            .find(|(index, _)| *index == recipient)
        else {
            return Err(Error::RecipientNotInJob { job, recipient });
        };
        if slot.1 {
            return Err(Error::AlreadyCompleted { job, recipient });
        }
        slot.1 = true;
        job_entry.remaining -= 1;
        let message = job_entry.message;
        let route = job_entry.route;
        if job_entry.remaining == 0 {
            self.jobs.remove(&job);
            if let Some(route_state) = self.routes.get_mut(route.0 as usize) {
                route_state.in_flight_jobs -= 1;
            }
        }

        let mut events = Vec::new();
        let Some(entry) = self.messages.get(&message) else {
            return Ok(events); // removed while in flight
        };
        let expires_at = entry.expires_at;
        let held = entry.held;
        let in_flight_here = recipient_in(&self.messages, message, recipient)
            .is_some_and(|r| r.state == RecipientState::InFlight(job));
        debug_assert!(in_flight_here, "job recipient not in flight in its message");
        if !in_flight_here {
            return Ok(events);
        }
        self.counts.in_flight -= 1;
        match outcome {
            Outcome::Delivered | Outcome::Failed => {
                self.finish(message, recipient, &mut events);
            }
            Outcome::Deferred if now >= expires_at => {
                events.push(Event::Expired { message, recipient });
                self.finish(message, recipient, &mut events);
            }
            Outcome::Deferred => {
                let attempts = self
                    .messages
                    .get_mut(&message)
                    .and_then(|m| m.recipient_mut(recipient))
                    .map_or(1, |r| r.attempts);
                let due = now
                    .plus_ms(self.jittered_delay_ms(attempts))
                    .min(expires_at);
                if held {
                    self.set_state(message, recipient, RecipientState::Held { due: Some(due) });
                    self.counts.held += 1;
                } else {
                    self.place_deferred(message, recipient, due);
                }
            }
        }
        Ok(events)
    }

    /// Moves every deferred recipient due at or before `now` to its route's ready queue,
    /// and expires those whose message is past the maximum age. Returns the expiries and
    /// the messages they finished.
    pub fn advance(&mut self, now: Timestamp) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(&Reverse((due, entry))) = self.retries.peek() {
            if due > now {
                break;
            }
            self.retries.pop();
            let Some(message_entry) = self.messages.get(&entry.message) else {
                continue;
            };
            let expires_at = message_entry.expires_at;
            let valid =
                recipient_in(&self.messages, entry.message, entry.recipient).is_some_and(|r| {
                    r.generation == entry.generation
                        && matches!(r.state, RecipientState::Deferred { .. })
                });
            if !valid {
                continue;
            }
            self.counts.deferred -= 1;
            if now >= expires_at {
                events.push(Event::Expired {
                    message: entry.message,
                    recipient: entry.recipient,
                });
                self.finish(entry.message, entry.recipient, &mut events);
            } else {
                self.place_ready(entry.message, entry.recipient);
            }
        }
        events
    }

    /// The earliest time the caller should call [`advance`](Self::advance) or
    /// [`next_job`](Self::next_job) again: the next retry or expiry, or the next rate
    /// token of a route with ready work and a free slot. May be early (stale heap
    /// entries), never late. `None` if nothing is waiting on time.
    pub fn next_wakeup(&self) -> Option<Timestamp> {
        let retry = self.retries.peek().map(|Reverse((due, _))| *due);
        let rate = self
            .routes
            .iter()
            .filter(|r| r.ready_live > 0 && r.in_flight_jobs < r.limits.max_concurrent)
            .filter_map(|r| r.bucket.as_ref().and_then(TokenBucket::next_token_at))
            .min();
        match (retry, rate) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Adds a route with `limits` (a configuration reload brought a new or changed
    /// upstream) and returns its id: the next index after the existing routes, which
    /// keep theirs.
    pub fn add_route(&mut self, limits: RouteLimits) -> Result<RouteId, Error> {
        limits.validate()?;
        let Ok(id) = u32::try_from(self.routes.len()) else {
            return Err(Error::InvalidConfig("more routes than a RouteId can name"));
        };
        self.routes.push(RouteState {
            bucket: limits.rate_per_second.map(TokenBucket::new),
            limits,
            ready: VecDeque::new(),
            ready_live: 0,
            in_flight_jobs: 0,
        });
        Ok(RouteId(id))
    }

    /// Moves a pending recipient to `route`, keeping its attempts and its state: a
    /// ready one is queued on the new route, a deferred one stays due when it was, a
    /// held one stays held. Returns `false` and changes nothing for a recipient in
    /// flight (move it once its job completes) or final.
    pub fn reroute(
        &mut self,
        message: MessageKey,
        recipient: RecipientIndex,
        route: RouteId,
    ) -> Result<bool, Error> {
        self.route_position(route)?;
        let Some(entry) = self
            .messages
            .get_mut(&message)
            .and_then(|m| m.recipient_mut(recipient))
        else {
            return Err(Error::UnknownMessage(message));
        };
        let old_route = entry.route;
        match entry.state {
            RecipientState::InFlight(_) | RecipientState::Final => Ok(false),
            RecipientState::Deferred { .. } | RecipientState::Held { .. } => {
                // The retry heap and the held set do not name the route: it is read
                // from the entry when the recipient becomes ready.
                entry.route = route;
                Ok(true)
            }
            RecipientState::Ready => {
                entry.route = route;
                self.uncount(old_route, RecipientState::Ready);
                // A fresh generation makes the old route's queue entry stale.
                self.place_ready(message, recipient);
                self.compact_ready_queues();
                Ok(true)
            }
        }
    }

    /// Forgets a message (queue delete). Its in-flight jobs may still be completed; their
    /// outcomes are ignored. No event is reported for it. Returns how many recipients
    /// were still pending.
    pub fn remove_message(&mut self, message: MessageKey) -> Result<usize, Error> {
        let Some(entry) = self.messages.remove(&message) else {
            return Err(Error::UnknownMessage(message));
        };
        for recipient in &entry.recipients {
            self.uncount(recipient.route, recipient.state);
        }
        self.compact_retries();
        self.compact_ready_queues();
        Ok(entry.unfinished)
    }

    /// Makes every deferred recipient of messages not on hold ready now (queue flush).
    /// Returns how many were moved.
    pub fn flush(&mut self) -> usize {
        let mut due: Vec<(MessageKey, RecipientIndex)> = Vec::new();
        for (&message, entry) in &self.messages {
            for recipient in &entry.recipients {
                if matches!(recipient.state, RecipientState::Deferred { .. }) {
                    due.push((message, recipient.index));
                }
            }
        }
        due.sort_unstable();
        for &(message, recipient) in &due {
            self.counts.deferred -= 1;
            self.place_ready(message, recipient);
        }
        self.compact_retries();
        due.len()
    }

    /// Makes the deferred recipients of one message ready now (`queue flush ID`); a held
    /// message stays held. Returns how many were moved.
    pub fn flush_message(&mut self, message: MessageKey) -> Result<usize, Error> {
        let Some(entry) = self.messages.get(&message) else {
            return Err(Error::UnknownMessage(message));
        };
        let due: Vec<RecipientIndex> = entry
            .recipients
            .iter()
            .filter(|recipient| matches!(recipient.state, RecipientState::Deferred { .. }))
            .map(|recipient| recipient.index)
            .collect();
        for &recipient in &due {
            self.counts.deferred -= 1;
            self.place_ready(message, recipient);
        }
        self.compact_retries();
        Ok(due.len())
    }

    /// Whether a message is on hold.
    pub fn is_held(&self, message: MessageKey) -> bool {
        self.messages.get(&message).is_some_and(|entry| entry.held)
    }

    /// Puts a message on hold: its ready and deferred recipients are set aside (not
    /// attempted, not expired); in-flight ones finish their attempt and, if deferred,
    /// are set aside too. Holding a held message does nothing.
    pub fn hold(&mut self, message: MessageKey) -> Result<(), Error> {
        let Some(entry) = self.messages.get_mut(&message) else {
            return Err(Error::UnknownMessage(message));
        };
        if entry.held {
            return Ok(());
        }
        entry.held = true;
        let mut moved = Vec::new();
        for recipient in &entry.recipients {
            match recipient.state {
                RecipientState::Ready => moved.push((recipient.index, recipient.route, None)),
                RecipientState::Deferred { due } => {
                    moved.push((recipient.index, recipient.route, Some(due)))
                }
                _ => {}
            }
        }
        for &(index, route, due) in &moved {
            let previous = self.set_state(message, index, RecipientState::Held { due });
            self.uncount(route, previous);
            self.counts.held += 1;
        }
        self.compact_retries();
        self.compact_ready_queues();
        Ok(())
    }

    /// Releases a held message: each set-aside recipient goes back to where it was
    /// (ready, or deferred until its due time, or ready if that has passed). Releasing a
    /// message that is not held does nothing.
    pub fn release(&mut self, message: MessageKey, now: Timestamp) -> Result<(), Error> {
        let Some(entry) = self.messages.get_mut(&message) else {
            return Err(Error::UnknownMessage(message));
        };
        if !entry.held {
            return Ok(());
        }
        entry.held = false;
        let held: Vec<(RecipientIndex, Option<Timestamp>)> = entry
            .recipients
            .iter()
            .filter_map(|r| match r.state {
                RecipientState::Held { due } => Some((r.index, due)),
                _ => None,
            })
            .collect();
        for &(index, due) in &held {
            self.counts.held -= 1;
            match due {
                Some(due) if due > now => self.place_deferred(message, index, due),
                _ => self.place_ready(message, index),
            }
        }
        Ok(())
    }

    /// Recipients not yet final, in any state.
    pub fn pending_count(&self) -> usize {
        let counts = self.counts;
        counts.ready + counts.in_flight + counts.deferred + counts.held
    }

    /// Recipients waiting for a retry.
    pub fn deferred_count(&self) -> usize {
        self.counts.deferred
    }

    /// Recipients by state.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Messages with at least one pending recipient.
    pub fn message_count(&self) -> usize {
        self.messages.len()
    }

    /// Jobs in flight on `route` (0 for an unknown route).
    pub fn in_flight(&self, route: RouteId) -> usize {
        self.routes
            .get(route.0 as usize)
            .map_or(0, |r| r.in_flight_jobs)
    }

    /// Recipients ready on `route` (0 for an unknown route).
    pub fn ready_count(&self, route: RouteId) -> usize {
        self.routes
            .get(route.0 as usize)
            .map_or(0, |r| r.ready_live)
    }

    /// Checks every internal invariant by walking all state; O(pending). For tests and
    /// debugging; returns a description of the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut counts = Counts::default();
        let mut ready_per_route = vec![0usize; self.routes.len()];
        for (message, entry) in &self.messages {
            let mut unfinished = 0;
            for recipient in &entry.recipients {
                match recipient.state {
                    RecipientState::Ready => {
                        counts.ready += 1;
                        if let Some(slot) = ready_per_route.get_mut(recipient.route.0 as usize) {
                            *slot += 1;
                        }
                        let queued = self
                            .routes
                            .get(recipient.route.0 as usize)
                            .is_some_and(|r| {
                                r.ready.iter().any(|q| {
                                    q.message == *message
                                        && q.recipient == recipient.index
                                        && q.generation == recipient.generation
                                })
                            });
                        if !queued {
                            return Err(format!(
                                "{message:?}/{:?} ready but not queued",
                                recipient.index
                            ));
                        }
                    }
                    RecipientState::InFlight(job) => {
                        counts.in_flight += 1;
                        let in_job = self.jobs.get(&job).is_some_and(|j| {
                            j.message == *message
                                && j.recipients
                                    .iter()
                                    .any(|&(i, done)| i == recipient.index && !done)
                        });
                        if !in_job {
                            return Err(format!(
                                "{message:?}/{:?} in flight outside its job",
                                recipient.index
                            ));
                        }
                    }
                    RecipientState::Deferred { due } => {
                        counts.deferred += 1;
                        let timed = self.retries.iter().any(|Reverse((d, q))| {
                            *d == due
                                && q.message == *message
                                && q.recipient == recipient.index
                                && q.generation == recipient.generation
                        });
                        if !timed {
                            return Err(format!(
                                "{message:?}/{:?} deferred without a timer",
                                recipient.index
                            ));
                        }
                    }
                    RecipientState::Held { .. } => {
                        counts.held += 1;
                        if !entry.held {
                            return Err(format!("{message:?} has held recipients but is not held"));
                        }
                    }
                    RecipientState::Final => continue,
                }
                unfinished += 1;
            }
            if unfinished != entry.unfinished || unfinished == 0 {
                return Err(format!(
                    "{message:?} unfinished count {} but {unfinished} pending",
                    entry.unfinished
                ));
            }
        }
        if counts != self.counts {
            return Err(format!("counts {:?}, walked {counts:?}", self.counts));
        }
        for (position, route) in self.routes.iter().enumerate() {
            if route.in_flight_jobs > route.limits.max_concurrent {
                return Err(format!("route {position} over its concurrency limit"));
            }
            let jobs = self
                .jobs
                .values()
                .filter(|j| j.route.0 as usize == position)
                .count();
            if jobs != route.in_flight_jobs {
                return Err(format!(
                    "route {position} counts {} jobs, has {jobs}",
                    route.in_flight_jobs
                ));
            }
            if ready_per_route.get(position) != Some(&route.ready_live) {
                return Err(format!("route {position} ready_live out of step"));
            }
        }
        Ok(())
    }

    // ---- internals ----

    fn route_exists(&self, route: RouteId) -> bool {
        (route.0 as usize) < self.routes.len()
    }

    fn route_position(&self, route: RouteId) -> Result<usize, Error> {
        if self.route_exists(route) {
            Ok(route.0 as usize)
        } else {
            Err(Error::UnknownRoute(route))
        }
    }

    fn bump_generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    /// Sets a recipient's state with a fresh generation; returns the previous state.
    fn set_state(
        &mut self,
        message: MessageKey,
        recipient: RecipientIndex,
        state: RecipientState,
    ) -> RecipientState {
        let generation = self.bump_generation();
        let Some(entry) = self
            .messages
            .get_mut(&message)
            .and_then(|m| m.recipient_mut(recipient))
        else {
            debug_assert!(false, "set_state on an unknown recipient");
            return RecipientState::Final;
        };
        entry.generation = generation;
        std::mem::replace(&mut entry.state, state)
    }

    /// Takes a recipient's old state out of the counters (not `held`, which callers
    /// handle, nor `in_flight`, which only `complete` changes).
    fn uncount(&mut self, route: RouteId, state: RecipientState) {
        match state {
            RecipientState::Ready => {
                self.counts.ready -= 1;
                if let Some(route_state) = self.routes.get_mut(route.0 as usize) {
                    route_state.ready_live -= 1;
                }
            }
            RecipientState::Deferred { .. } => self.counts.deferred -= 1,
            RecipientState::Held { .. } => self.counts.held -= 1,
            RecipientState::InFlight(_) => self.counts.in_flight -= 1,
            RecipientState::Final => {}
        }
    }

    fn place_ready(&mut self, message: MessageKey, recipient: RecipientIndex) {
        self.set_state(message, recipient, RecipientState::Ready);
        let Some(entry) = self
            .messages
            .get_mut(&message)
            .and_then(|m| m.recipient_mut(recipient))
        else {
            return;
        };
        let (route, generation) = (entry.route, entry.generation);
        if let Some(route_state) = self.routes.get_mut(route.0 as usize) {
            route_state.ready.push_back(QueueEntry {
                message,
                recipient,
                generation,
            });
            route_state.ready_live += 1;
        }
        self.counts.ready += 1;
    }

    fn place_deferred(&mut self, message: MessageKey, recipient: RecipientIndex, due: Timestamp) {
        self.set_state(message, recipient, RecipientState::Deferred { due });
        let Some(entry) = self
            .messages
            .get_mut(&message)
            .and_then(|m| m.recipient_mut(recipient))
        else {
            return;
        };
        self.retries.push(Reverse((
            due,
            QueueEntry {
                message,
                recipient,
                generation: entry.generation,
            },
        )));
        self.counts.deferred += 1;
    }

    /// Marks a recipient final (its old state already uncounted) and reports the message
    /// done if it was the last.
    fn finish(&mut self, message: MessageKey, recipient: RecipientIndex, events: &mut Vec<Event>) {
        self.set_state(message, recipient, RecipientState::Final);
        let Some(entry) = self.messages.get_mut(&message) else {
            return;
        };
        entry.unfinished -= 1;
        if entry.unfinished == 0 {
            self.messages.remove(&message);
            events.push(Event::MessageDone { message });
        }
    }

    fn jittered_delay_ms(&mut self, attempts: u32) -> u64 {
        let base_ms = self.retry.delay_ms(attempts) as f64;
        let factor = 1.0 + self.jitter_fraction * self.rng.next_signed_unit();
        (base_ms * factor).round().max(0.0) as u64
    }

    /// Drops stale ready-queue entries once they outnumber the live ones (plus slack),
    /// so a queue's length stays proportional to its ready recipients.
    fn compact_ready_queues(&mut self) {
        let messages = &self.messages;
        for route_state in &mut self.routes {
            let stale = route_state.ready.len() - route_state.ready_live;
            if stale > route_state.ready_live + COMPACTION_SLACK_ENTRIES {
                route_state.ready.retain(|q| {
                    recipient_in(messages, q.message, q.recipient).is_some_and(|r| {
                        r.generation == q.generation && r.state == RecipientState::Ready
                    })
                });
            }
        }
    }

    fn compact_retries(&mut self) {
        if self.retries.len() > self.counts.deferred * 2 + COMPACTION_SLACK_ENTRIES {
            let messages = &self.messages;
            self.retries.retain(|Reverse((_, q))| {
                recipient_in(messages, q.message, q.recipient).is_some_and(|r| {
                    r.generation == q.generation
                        && matches!(r.state, RecipientState::Deferred { .. })
                })
            });
        }
    }
}

/// The entry of `recipient` of `message`, if both exist.
fn recipient_in(
    messages: &HashMap<MessageKey, MessageEntry>,
    message: MessageKey,
    recipient: RecipientIndex,
) -> Option<&RecipientEntry> {
    let entry = messages.get(&message)?;
    let position = entry
        .recipients
        .binary_search_by_key(&recipient, |r| r.index)
        .ok()?;
    entry.recipients.get(position)
}
