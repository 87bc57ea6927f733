//! Messages and recipients per minute, hour and day, per [`Key`].
//!
//! # Algorithm: whole slots, counted conservatively
//!
//! Each window of length `W` is cut into 20 slots of `W / 20` (3 s for the minute, 3 min
//! for the hour, 72 min for the day). Per key and per configured limit a ring of
//! [`SLOTS_PER_WINDOW`] = 21 counters holds what was admitted in the current slot and the
//! 20 before it. A transaction is admitted when the ring's total plus the transaction
//! still fits the limit, and then added to the current slot.
//!
//! Why not the usual two weighted buckets, or a token bucket of the window's size? Both
//! are exact on smooth traffic, but both let a burst at the end of one bucket and another
//! at the start of the next through, so up to *twice* the limit can pass within one real
//! window; that is not an error bound a spam limit can live with. The ring is never
//! generous and is stingy by a known amount:
//!
//! * **Never more than the limit within any `W`:** any interval of length `W` lies within
//!   21 consecutive slots, the ring covered those 21 slots when the interval's last
//!   transaction was admitted, and the ring's total never exceeds the limit.
//! * **Refused only if the limit is full over at most `W + W/20`:** the ring spans from
//!   the start of the oldest slot to now, between `W` and `1.05 W`. So a sender is
//!   refused at most 5% earlier than an exact sliding window would refuse it; at a steady
//!   rate it gets at least `limit / 1.05` per `W`.
//!
//! Cost: 96 bytes per configured limit per key, an O(21) sum per check.

use crate::lru::LruMap;
use crate::{Error, Key, MAX_TRACKED_KEYS, Timestamp};

/// Slots per window, counting the current one: the window is split into
/// `SLOTS_PER_WINDOW - 1` = 20 slots, which bounds the stinginess at 1/20 = 5% of the
/// window ("within a few percent") for 84 bytes of counters per limit.
pub const SLOTS_PER_WINDOW: usize = 21;

/// Slots a window is split into; the ring holds one more, the current one.
const SLOTS_IN_WINDOW: u64 = SLOTS_PER_WINDOW as u64 - 1;

/// Default maximum number of keys a [`Limiter`] tracks: 100,000, several times the
/// distinct senders a single relay sees in a day. About 700 bytes each (estimated, not
/// measured) with all six limits configured and address keys (see [`Limiter`]), so about
/// 70 MB when full; usually one or two limits are set, about 200-300 bytes each.
pub const DEFAULT_LIMITER_MAX_KEYS: usize = 100_000;

/// The length of a rate limit's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    Minute,
    Hour,
    Day,
}

impl Window {
    pub const fn length_ms(self) -> u64 {
        match self {
            Self::Minute => 60 * 1_000,
            Self::Hour => 60 * 60 * 1_000,
            Self::Day => 24 * 60 * 60 * 1_000,
        }
    }

    /// A slot's length; every window length is a multiple of 20 ms.
    const fn slot_ms(self) -> u64 {
        self.length_ms() / SLOTS_IN_WINDOW
    }
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counter {
    /// One per transaction.
    Messages,
    /// One per recipient of a transaction.
    Recipients,
}

/// Rate limits per key; `None` leaves that limit off. A configured limit is at least 1
/// (to refuse a sender altogether, use an access rule, not a rate of zero). Also the
/// `[rate_limits.per_user]` and `[rate_limits.per_client]` tables of the configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    pub messages_per_minute: Option<u32>,
    pub messages_per_hour: Option<u32>,
    pub messages_per_day: Option<u32>,
    pub recipients_per_minute: Option<u32>,
    pub recipients_per_hour: Option<u32>,
    pub recipients_per_day: Option<u32>,
}

impl RateLimits {
    /// No limit is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The limits set, e.g. `60 messages/minute, 500 recipients/day`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = [
            (self.messages_per_minute, "messages/minute"),
            (self.messages_per_hour, "messages/hour"),
            (self.messages_per_day, "messages/day"),
            (self.recipients_per_minute, "recipients/minute"),
            (self.recipients_per_hour, "recipients/hour"),
            (self.recipients_per_day, "recipients/day"),
        ]
        .into_iter()
        .filter_map(|(limit, unit)| limit.map(|limit| format!("{limit} {unit}")))
        .collect();
        parts.join(", ")
    }

    fn rules(&self) -> Vec<Rule> {
        [
            (Window::Minute, Counter::Messages, self.messages_per_minute),
            (Window::Hour, Counter::Messages, self.messages_per_hour),
            (Window::Day, Counter::Messages, self.messages_per_day),
            (
                Window::Minute,
                Counter::Recipients,
                self.recipients_per_minute,
            ),
            (Window::Hour, Counter::Recipients, self.recipients_per_hour),
            (Window::Day, Counter::Recipients, self.recipients_per_day),
        ]
        .into_iter()
        .filter_map(|(window, counter, limit)| {
            limit.map(|limit| Rule {
                window,
                counter,
                limit,
            })
        })
        .collect()
    }
}

/// A refused transaction: which limit it would break and when it would fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    pub window: Window,
    pub counter: Counter,
    pub limit: u32,
    /// Seconds (rounded up, at least 1) until this transaction would be admitted by every
    /// limit if nothing else is counted meanwhile. `None` when it never can: it alone has
    /// more recipients than a recipient limit, and must be split (RFC 5321 section
    /// 4.5.3.1.10: `452 4.5.3` for the excess recipients).
    pub retry_after_secs: Option<u32>,
}

/// Counts of a [`Limiter`] for monitoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimiterStats {
    pub tracked_keys: usize,
    /// Keys pushed out, since creation, because the table was full; each one forgot what
    /// it had sent.
    pub evictions: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rule {
    window: Window,
    counter: Counter,
    /// At least 1.
    limit: u32,
}

impl Rule {
    fn amount(&self, recipients: u32) -> u32 {
        match self.counter {
            Counter::Messages => 1,
            Counter::Recipients => recipients,
        }
    }
}

/// The counters of one limit for one key.
#[derive(Debug, Clone, Copy)]
struct Ring {
    /// The absolute number (`unix_ms / slot_ms`) of the latest slot counted into.
    newest_slot: u64,
    /// Admitted amounts of slots `newest_slot - 20 ..= newest_slot`, slot `s` at
    /// `s % SLOTS_PER_WINDOW`. Their total never exceeds the rule's limit.
    counts: [u32; SLOTS_PER_WINDOW],
}

impl Ring {
    fn new(slot: u64) -> Self {
        Self {
            newest_slot: slot,
            counts: [0; SLOTS_PER_WINDOW],
        }
    }

    /// Moves the ring forward to `slot`, clearing the slots that fall out of it. A slot
    /// not after `newest_slot` changes nothing.
    fn advance(&mut self, slot: u64) {
        if slot <= self.newest_slot {
            return;
        }
        let steps = (slot - self.newest_slot).min(SLOTS_PER_WINDOW as u64);
        for step in 1..=steps {
            let position = ((self.newest_slot + step) % SLOTS_PER_WINDOW as u64) as usize;
            if let Some(count) = self.counts.get_mut(position) {
                *count = 0;
            }
        }
        self.newest_slot = slot;
    }

    fn total(&self) -> u64 {
        self.counts.iter().map(|&count| u64::from(count)).sum()
    }

    /// Adds to the current slot. The caller has checked that the total stays within the
    /// limit, so no count can overflow.
    fn add(&mut self, amount: u32) {
        let position = (self.newest_slot % SLOTS_PER_WINDOW as u64) as usize;
        if let Some(count) = self.counts.get_mut(position) {
            *count = count.saturating_add(amount);
        }
    }

    /// Milliseconds after `now_ms` (the ring advanced to now) until `amount` more would
    /// fit within `limit`: the time at which enough of the oldest slots have left.
    /// `None` if `amount` alone is over the limit.
    fn wait_ms(&self, amount: u32, limit: u32, now_ms: u64, slot_ms: u64) -> Option<u64> {
        if amount > limit {
            return None;
        }
        let excess = (self.total() + u64::from(amount)).saturating_sub(u64::from(limit));
        let mut freed = 0u64;
        for step in 0..SLOTS_PER_WINDOW as u64 {
            if freed >= excess {
                // Slot `oldest + step - 1` leaves when the ring reaches `newest + step`.
                let at_ms = (self.newest_slot + step).saturating_mul(slot_ms);
                return Some(at_ms.saturating_sub(now_ms));
            }
            // Slot `newest - 20 + step`, whose position is `newest + 1 + step` modulo 21
            // (written so that no slot number goes below zero near the epoch).
            let position = ((self.newest_slot + 1 + step) % SLOTS_PER_WINDOW as u64) as usize;
            freed += u64::from(self.counts.get(position).copied().unwrap_or(0));
        }
        // Every slot has left once the ring reaches `newest + 21`.
        let at_ms = (self.newest_slot + SLOTS_PER_WINDOW as u64).saturating_mul(slot_ms);
        Some(at_ms.saturating_sub(now_ms))
    }
}

/// Per-key rate limits over sliding windows (see the module documentation for the
/// algorithm and its bounds).
///
/// Memory: at most `max_tracked_keys` keys; each costs a hash-table slot and a list
/// node (about 90 bytes with its key), the key's user name if any (at most
/// [`MAX_USER_NAME_BYTES`](crate::MAX_USER_NAME_BYTES), stored twice), and 96 bytes per
/// configured limit.
#[derive(Debug)]
pub struct Limiter {
    /// The configured limits, at most six, each with a limit of at least 1.
    rules: Vec<Rule>,
    /// One ring per rule, in the order of `rules`, for every tracked key.
    keys: LruMap<Key, Box<[Ring]>>,
    /// The latest `now` seen; earlier times are treated as this one.
    latest: Timestamp,
}

impl Limiter {
    /// `max_tracked_keys` is between 1 and [`MAX_TRACKED_KEYS`].
    pub fn new(limits: RateLimits, max_tracked_keys: usize) -> Result<Self, Error> {
        let rules = limits.rules();
        if rules.iter().any(|rule| rule.limit == 0) {
            return Err(Error::InvalidRateLimits(
                "a limit of 0 refuses everything; leave the limit unset or use an access rule",
            ));
        }
        if max_tracked_keys == 0 || max_tracked_keys > MAX_TRACKED_KEYS {
            return Err(Error::InvalidRateLimits(
                "the number of tracked keys must be between 1 and 1,000,000",
            ));
        }
        Ok(Self {
            rules,
            keys: LruMap::new(max_tracked_keys),
            latest: Timestamp::from_unix_ms(0),
        })
    }

    /// Counts one message with `recipients` recipients against every limit of `key`, or
    /// refuses it and counts nothing. The server answers a refusal with `451 4.7.1`
    /// (`452 4.7.1` at RCPT) and the retry time in the text.
    pub fn check_message(
        &mut self,
        key: &Key,
        recipients: u32,
        now: Timestamp,
    ) -> Result<(), Exceeded> {
        if self.rules.is_empty() {
            return Ok(());
        }
        let now = self.observe(now);
        let rules = &self.rules;
        let rings = self.keys.entry(key, || fresh_rings(rules, now));
        for (rule, ring) in rules.iter().zip(rings.iter_mut()) {
            ring.advance(now.unix_ms / rule.window.slot_ms());
        }
        refusal(rules, rings.iter().copied(), recipients, now)?;
        for (rule, ring) in rules.iter().zip(rings.iter_mut()) {
            ring.add(rule.amount(recipients));
        }
        Ok(())
    }

    /// Whether a message with `recipients` recipients would be admitted now, counting
    /// nothing and tracking no new key: for a decision at each `RCPT TO`, passing the
    /// recipients accepted so far plus this one. The message is counted by
    /// [`check_message`](Self::check_message) at the end of `DATA`, which can still
    /// refuse it if other sessions of the same key got there first.
    pub fn check_recipient(
        &self,
        key: &Key,
        recipients: u32,
        now: Timestamp,
    ) -> Result<(), Exceeded> {
        if self.rules.is_empty() {
            return Ok(());
        }
        let now = now.max(self.latest);
        let Some(rings) = self.keys.peek(key) else {
            // An untracked key has nothing counted: only a transaction too large for a
            // limit is refused.
            return refusal(
                &self.rules,
                self.rules
                    .iter()
                    .map(|rule| Ring::new(now.unix_ms / rule.window.slot_ms())),
                recipients,
                now,
            );
        };
        // Advanced copies on the stack: a pure check allocates nothing.
        let advanced = self.rules.iter().zip(rings.iter()).map(|(rule, ring)| {
            let mut ring = *ring;
            ring.advance(now.unix_ms / rule.window.slot_ms());
            ring
        });
        refusal(&self.rules, advanced, recipients, now)
    }

    /// Forgets up to `max_entries` least recently used keys that have nothing counted in
    /// any window any more; returns how many. Optional (a full table evicts anyway); a
    /// periodic call gives memory back to the allocator's free lists sooner.
    pub fn purge_idle(&mut self, now: Timestamp, max_entries: usize) -> usize {
        let now = self.observe(now);
        let rules = &self.rules;
        self.keys.remove_idle_tail(max_entries, |rings| {
            rules.iter().zip(rings.iter()).all(|(rule, ring)| {
                let mut ring = *ring;
                ring.advance(now.unix_ms / rule.window.slot_ms());
                ring.total() == 0
            })
        })
    }

    pub fn stats(&self) -> LimiterStats {
        LimiterStats {
            tracked_keys: self.keys.len(),
            evictions: self.keys.evictions(),
        }
    }

    /// Checks the table's structure, its bound, and that no ring holds more than its
    /// limit or counts from the future.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.keys.check_invariants()?;
        for rings in self.keys.values() {
            if rings.len() != self.rules.len() {
                return Err(format!(
                    "{} rings for {} rules",
                    rings.len(),
                    self.rules.len()
                ));
            }
            for (rule, ring) in self.rules.iter().zip(rings.iter()) {
                if ring.total() > u64::from(rule.limit) {
                    return Err(format!(
                        "{:?} {:?} holds {} over limit {}",
                        rule.window,
                        rule.counter,
                        ring.total(),
                        rule.limit
                    ));
                }
                if ring.newest_slot > self.latest.unix_ms / rule.window.slot_ms() {
                    return Err(format!("{:?} ring is ahead of the clock", rule.window));
                }
            }
        }
        Ok(())
    }

    fn observe(&mut self, now: Timestamp) -> Timestamp {
        self.latest = self.latest.max(now);
        self.latest
    }
}

fn fresh_rings(rules: &[Rule], now: Timestamp) -> Box<[Ring]> {
    rules
        .iter()
        .map(|rule| Ring::new(now.unix_ms / rule.window.slot_ms()))
        .collect()
}

/// The binding refusal of a transaction against rings advanced to `now`: one that can
/// never fit if any, else the one with the longest wait, so that `retry_after_secs` is
/// when every limit admits it.
fn refusal(
    rules: &[Rule],
    rings: impl Iterator<Item = Ring>,
    recipients: u32,
    now: Timestamp,
) -> Result<(), Exceeded> {
    let mut worst: Option<(Option<u64>, Exceeded)> = None;
    for (rule, ring) in rules.iter().zip(rings) {
        let amount = rule.amount(recipients);
        if ring.total() + u64::from(amount) <= u64::from(rule.limit) {
            continue;
        }
        let wait_ms = ring.wait_ms(amount, rule.limit, now.unix_ms, rule.window.slot_ms());
        let exceeded = Exceeded {
            window: rule.window,
            counter: rule.counter,
            limit: rule.limit,
            retry_after_secs: wait_ms
                .map(|ms| u32::try_from(ms.div_ceil(1_000).max(1)).unwrap_or(u32::MAX)),
        };
        let worse = match &worst {
            None => true,
            Some((None, _)) => false,
            Some((Some(longest), _)) => wait_ms.is_none_or(|ms| ms > *longest),
        };
        if worse {
            worst = Some((wait_ms, exceeded));
        }
    }
    match worst {
        Some((_, exceeded)) => Err(exceeded),
        None => Ok(()),
    }
}
