//! Sending quotas per upstream account: messages and recipients over a rolling 24 hours,
//! kept across restarts in `<spool>/quotas.json`.
//!
//! Google limits what one account may send through it in any 24 hours (smtp-relay:
//! 10,000 messages and 10,000 recipients per user; a Gmail account far fewer) and
//! answers a transaction over the limit with `550 5.4.5` (see
//! `tsubame_delivery::reply_class`). A 5yz would bounce the mail. tsubame counts what it
//! sent instead and stops before Google refuses: the dispatcher asks
//! [`Quotas::begin`] (or [`Quotas::check`]) before it hands out a job, defers the job or
//! sends it to a fallback upstream when the quota refuses, and tells
//! [`Quotas::finish`] (or [`Quotas::record`]) what the upstream accepted.
//!
//! Nothing here reads a clock or spawns a thread: every call takes `now_unix_ms`. Only
//! [`Quotas::load`], [`Quotas::save`] and [`QuotaSnapshot::write_atomically`] touch the
//! disk.
//!
//! # Window: whole buckets, counted conservatively
//!
//! Time is cut into buckets of [`BUCKET_MS`] (15 minutes); an account keeps one count of
//! messages and one of recipients per bucket, for the current bucket and the 96 before
//! it. A bucket counts until the window has moved 97 buckets past its start, so what was
//! sent at `t` counts for at least 24 hours (never looser than an exact rolling window)
//! and at most 24 hours and 15 minutes (at most one bucket stricter):
//!
//! * a transaction at `t` lies in the bucket `s = t / BUCKET_MS` and counts while
//!   `now < (s + 97) × BUCKET_MS`;
//! * `s × BUCKET_MS ≤ t < (s + 1) × BUCKET_MS`, so `t + 24 h < (s + 97) × BUCKET_MS ≤
//!   t + 24 h + 15 min`.
//!
//! Memory: at most 97 buckets (12 bytes each, plus the deque's slack) per account, and
//! at most [`MAX_TRACKED_ACCOUNTS`] accounts.
//!
//! A clock that steps back counts into the newest bucket, and buckets from the future
//! (after a step back, or in a file written before one) are folded into the current
//! bucket: they then count for another full window, which is stricter than the truth and
//! never looser, and no bucket can outlive the window by more than the step.
//!
//! # Reserve
//!
//! Google counts what it sees, and it sees mail tsubame never does (the account's own
//! Gmail, other programs, a restart that lost the last counts). [`QuotaLimits`] keeps a
//! percentage of each limit back: [`Quotas::check`] refuses once a transaction would go
//! past `limit - reserve`, so the caller defers or spills to a fallback before Google
//! starts refusing.
//!
//! # In flight
//!
//! The dispatcher hands out many jobs before the first one reports. [`Quotas::begin`]
//! counts a job's message and recipients as in flight until [`Quotas::finish`], so jobs
//! handed out together cannot overshoot a quota between them. In-flight counts live in
//! memory only: after a restart those jobs are attempted again anyway.
//!
//! # Use
//!
//! * At start: [`Quotas::load`] from `<spool>/`[`FILE_NAME`].
//! * Before handing out a job: [`Quotas::begin`] with the job's key and recipient count.
//!   Refused: send it through the fallback upstream (its own key, its own `begin`), or
//!   put it back as deferred until [`QuotaExhausted::until_unix_ms`]; `None` there means
//!   the job has more recipients than the quota allows, and [`Quotas::headroom`] says how
//!   many to send now.
//! * When the job's report comes: [`Quotas::finish`] with the recipients the upstream
//!   accepted. A reply that `tsubame_delivery::classify_reply` calls a spent quota
//!   becomes [`Quotas::block_until`] (account) or [`Quotas::block_upstream_until`]
//!   (customer-wide).
//! * Every few seconds while [`Quotas::is_dirty`], and once at shutdown after the last
//!   report: [`Quotas::save`].
//!
//! # Persistence
//!
//! [`Quotas::save`] writes the file atomically (temporary file, fsync, rename, fsync of
//! the directory); [`Quotas::load`] restores it and never refuses to start: a missing,
//! unreadable, corrupt or unknown-version file is logged and counting starts from zero.
//! The format and its crash analysis are in `spool-format/quotas.md`.

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[cfg(test)]
mod tests;

/// The length of the rolling window: Google's quotas are per 24 hours.
pub const WINDOW_MS: u64 = 24 * 60 * 60 * 1_000;

/// The length of a bucket, and so how much stricter than an exact window the count may
/// be. 15 minutes is 1% of the window for 97 buckets (about 1.2 KB) per account; a
/// quota nobody reaches within 15 minutes of its end loses nothing by it.
pub const BUCKET_MS: u64 = 15 * 60 * 1_000;

/// Buckets the window is cut into (96); an account holds one more, the current one.
const BUCKETS_IN_WINDOW: u64 = WINDOW_MS / BUCKET_MS;

/// Most buckets one account holds: the window's 96 and the current one.
pub const BUCKETS_PER_ACCOUNT_MAX: usize = BUCKETS_IN_WINDOW as usize + 1;

/// Most accounts tracked at once. An account is an upstream's XOAUTH2 user or, on
/// smtp-relay, an envelope sender: far fewer than this in any one organisation. About
/// 1.3 KB each when every bucket is used, so 13 MB at most, and a quota file of at most
/// about 30 MB. When the table is full, a new account is not tracked (see
/// [`Quotas::record`]).
pub const MAX_TRACKED_ACCOUNTS: usize = 10_000;

/// Longest upstream name or account kept in a [`QuotaKey`]; longer ones are cut (at a
/// character boundary). RFC 5321 §4.5.3.1.3 bounds a path at 256 bytes, so no real
/// address is cut; two keys that differ only past this share a count, which is stricter,
/// never looser.
pub const MAX_KEY_PART_BYTES: usize = 512;

/// Longest block [`Quotas::block_until`] sets: one window. A daily quota frees up within
/// a day whatever the upstream said.
pub const MAX_BLOCK_MS: u64 = WINDOW_MS;

/// Largest quota file [`Quotas::load`] reads. A full table writes about half of this.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// The file's name in the spool directory.
pub const FILE_NAME: &str = "quotas.json";

/// The `format` field of the file.
pub const FORMAT_NAME: &str = "tsubame-quotas";

/// The `version` field this code writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;

/// Whose sending a quota counts: an upstream (its configured name) and an account on it
/// (the XOAUTH2 user of smtp.gmail.com, or the envelope sender on smtp-relay.gmail.com,
/// which counts per user). Compared byte for byte: the caller normalises case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QuotaKey {
    /// At most `MAX_KEY_PART_BYTES`.
    upstream: String,
    /// At most `MAX_KEY_PART_BYTES`.
    account: String,
}

impl QuotaKey {
    /// Cuts either part at [`MAX_KEY_PART_BYTES`].
    pub fn new(upstream: &str, account: &str) -> Self {
        Self {
            upstream: cut(upstream).to_string(),
            account: cut(account).to_string(),
        }
    }

    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    pub fn account(&self) -> &str {
        &self.account
    }
}

fn cut(text: &str) -> &str {
    if text.len() <= MAX_KEY_PART_BYTES {
        return text;
    }
    let mut end = MAX_KEY_PART_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default()
}

/// One account's daily quota; `None` leaves that limit off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaLimits {
    /// Transactions (one per message and upstream attempt that the upstream accepted).
    pub messages_per_day: Option<u32>,
    /// Accepted recipients, summed over transactions.
    pub recipients_per_day: Option<u32>,
    /// Percentage of each limit kept back (values above 100 count as 100): a transaction
    /// is refused once it would go past `limit - ceil(limit × reserve_percent / 100)`.
    pub reserve_percent: u8,
}

impl QuotaLimits {
    /// What [`Quotas::check`] admits up to under `limit`: the limit less the reserve,
    /// rounded towards refusing.
    pub fn allowed(&self, limit: u32) -> u32 {
        let reserve_percent = u64::from(self.reserve_percent.min(100));
        let reserved = (u64::from(limit) * reserve_percent).div_ceil(100);
        u32::try_from(u64::from(limit).saturating_sub(reserved)).unwrap_or(limit)
    }
}

/// Why a transaction does not fit now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaExhausted {
    pub which: Exhausted,
    /// When this transaction would fit if nothing else were counted meanwhile (and the
    /// transactions in flight were all accepted now). `None` when it never can: it alone
    /// has more recipients than the quota allows. The caller then sends it in parts of
    /// at most [`Usage::allowed`] recipients (it splits per
    /// `max_recipients_per_transaction` anyway; [`Quotas::headroom`] says how many
    /// fit now).
    pub until_unix_ms: Option<u64>,
}

/// Which limit refused a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    Messages(Usage),
    Recipients(Usage),
    /// The upstream itself said the account (or, with `upstream_wide`, every account on
    /// that upstream) is over its quota: see [`Quotas::block_until`].
    Blocked {
        upstream_wide: bool,
    },
}

/// One counter at the time of a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Counted in the window, in flight included.
    pub used: u64,
    /// The configured daily limit.
    pub limit: u32,
    /// The limit less the reserve: what is admitted. A refusal with
    /// `used + transaction <= limit` came from the reserve alone.
    pub allowed: u32,
}

/// How much more an account may send now. `None`: no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headroom {
    pub messages: Option<u32>,
    /// The most recipients one more transaction may have now (0 when the message quota
    /// is spent or the account is blocked).
    pub recipients: Option<u32>,
}

/// A job counted as in flight by [`Quotas::begin`]; give it back to
/// [`Quotas::finish`] when the job is over, whatever its outcome. A reservation that is
/// dropped instead stays counted until the process ends (stricter, never looser).
#[must_use = "a reservation counts until it is given to Quotas::finish"]
#[derive(Debug)]
pub struct Reservation {
    key: QuotaKey,
    recipients: u32,
    /// Whether `begin` counted it: false for accounts without limits and when the table
    /// was full.
    counted: bool,
}

impl Reservation {
    pub fn key(&self) -> &QuotaKey {
        &self.key
    }

    pub fn recipients(&self) -> u32 {
        self.recipients
    }
}

/// One account as `tsubame queue` and metrics show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaStatus {
    pub key: QuotaKey,
    pub limits: Option<QuotaLimits>,
    /// Accepted in the window (in flight not included).
    pub messages_used: u64,
    pub recipients_used: u64,
    pub messages_in_flight: u32,
    pub recipients_in_flight: u64,
    /// Set by [`Quotas::block_until`] on this account, while in the future.
    pub blocked_until_unix_ms: Option<u64>,
    /// What [`Quotas::check`] says now of a message with one recipient.
    pub next_message: Result<(), QuotaExhausted>,
}

/// Counts for monitoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaStats {
    pub tracked_accounts: usize,
    /// Transactions not counted since start because the table was full.
    pub untracked_records: u64,
}

/// What [`Quotas::load`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadOutcome {
    /// No file: the first start (or the file was removed). Counting starts from zero.
    Missing,
    /// Restored; buckets older than the window were dropped.
    Loaded { accounts: usize },
    /// The file could not be used; counting starts from zero and the next save replaces
    /// it.
    Discarded { reason: String },
}

/// A quota file could not be written. The previous file, if any, is intact.
#[derive(Debug, thiserror::Error)]
#[error("cannot save the sending quotas to {}: {step}: {source}", path.display())]
pub struct QuotaSaveError {
    pub path: PathBuf,
    /// What failed: "creating the temporary file", "writing", "syncing", "renaming",
    /// "syncing the directory".
    pub step: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// Counts of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    /// `start_unix_ms / BUCKET_MS`.
    slot: u64,
    messages: u32,
    recipients: u32,
}

/// What is known of one account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Account {
    /// Oldest first; slots strictly increasing; at most `BUCKETS_PER_ACCOUNT_MAX` after
    /// `advance`. Buckets that left the window are dropped by the next `advance`.
    buckets: VecDeque<Bucket>,
    /// Jobs between `begin` and `finish`.
    in_flight_messages: u32,
    in_flight_recipients: u64,
    /// Refuse everything until then (the upstream said the quota is spent).
    blocked_until_unix_ms: Option<u64>,
}

fn slot_of(unix_ms: u64) -> u64 {
    unix_ms / BUCKET_MS
}

/// The oldest slot still counted when the current slot is `now_slot`.
fn oldest_counted_slot(now_slot: u64) -> u64 {
    now_slot.saturating_sub(BUCKETS_IN_WINDOW)
}

/// When a bucket of `slot` stops counting.
fn leaves_at_unix_ms(slot: u64) -> u64 {
    slot.saturating_add(BUCKETS_IN_WINDOW + 1)
        .saturating_mul(BUCKET_MS)
}

impl Account {
    /// Drops the buckets that left the window and folds buckets from the future into
    /// the current one.
    fn advance(&mut self, now_slot: u64) {
        let oldest = oldest_counted_slot(now_slot);
        while self
            .buckets
            .front()
            .is_some_and(|bucket| bucket.slot < oldest)
        {
            self.buckets.pop_front();
        }
        let mut future: Option<Bucket> = None;
        while let Some(bucket) = self.buckets.back().copied()
            && bucket.slot > now_slot
        {
            self.buckets.pop_back();
            future = Some(match future {
                None => bucket,
                Some(sum) => merge(sum, bucket),
            });
        }
        if let Some(future) = future {
            self.add_to_current(Bucket {
                slot: now_slot,
                ..future
            });
        }
    }

    /// Adds to the newest bucket if it is `bucket.slot`, else appends. The caller has
    /// advanced to `bucket.slot`, so no bucket is newer.
    fn add_to_current(&mut self, bucket: Bucket) {
        match self.buckets.back_mut() {
            Some(newest) if newest.slot == bucket.slot => *newest = merge(*newest, bucket),
            _ => self.buckets.push_back(bucket),
        }
    }

    /// The buckets counted at `now_slot`, oldest first, those from the future as if in
    /// the current slot: what `advance(now_slot)` would leave, without changing anything.
    fn counted(&self, now_slot: u64) -> impl Iterator<Item = Bucket> + Clone + '_ {
        let oldest = oldest_counted_slot(now_slot);
        self.buckets
            .iter()
            .filter(move |bucket| bucket.slot >= oldest)
            .map(move |bucket| Bucket {
                slot: bucket.slot.min(now_slot),
                ..*bucket
            })
    }

    fn used(&self, now_slot: u64) -> (u64, u64) {
        self.counted(now_slot)
            .fold((0, 0), |(messages, recipients), bucket| {
                (
                    messages + u64::from(bucket.messages),
                    recipients + u64::from(bucket.recipients),
                )
            })
    }

    fn blocked_at(&self, now_unix_ms: u64) -> Option<u64> {
        self.blocked_until_unix_ms
            .filter(|&until| until > now_unix_ms)
    }

    /// Nothing counted, nothing in flight, no block: the account can be forgotten.
    fn is_idle(&self, now_unix_ms: u64) -> bool {
        self.counted(slot_of(now_unix_ms)).next().is_none()
            && self.in_flight_messages == 0
            && self.in_flight_recipients == 0
            && self.blocked_at(now_unix_ms).is_none()
    }
}

fn merge(a: Bucket, b: Bucket) -> Bucket {
    Bucket {
        slot: a.slot,
        messages: a.messages.saturating_add(b.messages),
        recipients: a.recipients.saturating_add(b.recipients),
    }
}

/// The limits of each key, asked at every check: the caller's configuration.
type LimitsFn = Box<dyn Fn(&QuotaKey) -> Option<QuotaLimits> + Send>;

/// Rolling daily counters per [`QuotaKey`], with in-flight reservations and blocks set
/// from upstream replies. Owned by the dispatcher thread; no lock inside.
pub struct Quotas {
    limits: LimitsFn,
    /// At most `MAX_TRACKED_ACCOUNTS`. Sorted, so the file and `status` are in key order.
    accounts: BTreeMap<QuotaKey, Account>,
    /// Blocks on every account of an upstream (Google's per-customer limits), by
    /// upstream name. At most one per upstream the caller blocked; dropped once past.
    upstream_blocks: BTreeMap<String, u64>,
    /// Something the file holds changed since the last snapshot.
    dirty: bool,
    untracked_records: u64,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas")
            .field("accounts", &self.accounts.len())
            .field("upstream_blocks", &self.upstream_blocks.len())
            .field("dirty", &self.dirty)
            .finish_non_exhaustive()
    }
}

impl Quotas {
    /// Starts with nothing counted. `limits` says each key's quota (`None`: no quota;
    /// such keys are neither counted nor refused, except by a block).
    pub fn new(limits: impl Fn(&QuotaKey) -> Option<QuotaLimits> + Send + 'static) -> Self {
        Self {
            limits: Box::new(limits),
            accounts: BTreeMap::new(),
            upstream_blocks: BTreeMap::new(),
            dirty: false,
            untracked_records: 0,
        }
    }

    /// Would a transaction of `recipients` recipients fit now? Counts nothing.
    pub fn check(
        &self,
        key: &QuotaKey,
        recipients: u32,
        now_unix_ms: u64,
    ) -> Result<(), QuotaExhausted> {
        let now_slot = slot_of(now_unix_ms);
        let account = self.accounts.get(key);
        let mut worst: Option<QuotaExhausted> = None;
        let mut consider = |refusal: QuotaExhausted| {
            // The binding refusal is the one that lasts longest ("never" longest of all),
            // so that `until` is when every limit admits the transaction.
            let rank = |refusal: &QuotaExhausted| refusal.until_unix_ms.unwrap_or(u64::MAX);
            if worst
                .as_ref()
                .is_none_or(|worst| rank(&refusal) > rank(worst))
            {
                worst = Some(refusal);
            }
        };
        if let Some(until) = self
            .upstream_blocks
            .get(key.upstream())
            .copied()
            .filter(|&until| until > now_unix_ms)
        {
            consider(QuotaExhausted {
                which: Exhausted::Blocked {
                    upstream_wide: true,
                },
                until_unix_ms: Some(until),
            });
        }
        if let Some(until) = account.and_then(|account| account.blocked_at(now_unix_ms)) {
            consider(QuotaExhausted {
                which: Exhausted::Blocked {
                    upstream_wide: false,
                },
                until_unix_ms: Some(until),
            });
        }
        if let Some(limits) = (self.limits)(key) {
            let empty = Account::default();
            let account = account.unwrap_or(&empty);
            if let Some(limit) = limits.messages_per_day {
                let allowed = limits.allowed(limit);
                let counted = account
                    .counted(now_slot)
                    .map(|bucket| (bucket.slot, bucket.messages));
                let in_flight = u64::from(account.in_flight_messages);
                if let Some((used, until_unix_ms)) =
                    refusal(counted, in_flight, 1, allowed, now_slot)
                {
                    consider(QuotaExhausted {
                        which: Exhausted::Messages(Usage {
                            used,
                            limit,
                            allowed,
                        }),
                        until_unix_ms,
                    });
                }
            }
            if let Some(limit) = limits.recipients_per_day {
                let allowed = limits.allowed(limit);
                let counted = account
                    .counted(now_slot)
                    .map(|bucket| (bucket.slot, bucket.recipients));
                let in_flight = account.in_flight_recipients;
                if let Some((used, until_unix_ms)) =
                    refusal(counted, in_flight, recipients, allowed, now_slot)
                {
                    consider(QuotaExhausted {
                        which: Exhausted::Recipients(Usage {
                            used,
                            limit,
                            allowed,
                        }),
                        until_unix_ms,
                    });
                }
            }
        }
        match worst {
            Some(refusal) => Err(refusal),
            None => Ok(()),
        }
    }

    /// How much more `key` may send now.
    pub fn headroom(&self, key: &QuotaKey, now_unix_ms: u64) -> Headroom {
        let blocked = self
            .upstream_blocks
            .get(key.upstream())
            .is_some_and(|&until| until > now_unix_ms)
            || self
                .accounts
                .get(key)
                .is_some_and(|account| account.blocked_at(now_unix_ms).is_some());
        if blocked {
            return Headroom {
                messages: Some(0),
                recipients: Some(0),
            };
        }
        let Some(limits) = (self.limits)(key) else {
            return Headroom {
                messages: None,
                recipients: None,
            };
        };
        let (messages_used, recipients_used) = match self.accounts.get(key) {
            Some(account) => {
                let (messages, recipients) = account.used(slot_of(now_unix_ms));
                (
                    messages + u64::from(account.in_flight_messages),
                    recipients + account.in_flight_recipients,
                )
            }
            None => (0, 0),
        };
        let left = |limit: u32, used: u64| {
            u32::try_from(u64::from(limits.allowed(limit)).saturating_sub(used)).unwrap_or(0)
        };
        let messages = limits
            .messages_per_day
            .map(|limit| left(limit, messages_used));
        let recipients = match messages {
            Some(0) => Some(0),
            _ => limits
                .recipients_per_day
                .map(|limit| left(limit, recipients_used)),
        };
        Headroom {
            messages,
            recipients,
        }
    }

    /// Checks a job and, when it fits, counts it as in flight until
    /// [`finish`](Self::finish).
    pub fn begin(
        &mut self,
        key: &QuotaKey,
        recipients: u32,
        now_unix_ms: u64,
    ) -> Result<Reservation, QuotaExhausted> {
        self.check(key, recipients, now_unix_ms)?;
        let mut counted = false;
        if (self.limits)(key).is_some()
            && let Some(account) = self.account_mut(key, now_unix_ms)
        {
            account.in_flight_messages = account.in_flight_messages.saturating_add(1);
            account.in_flight_recipients = account
                .in_flight_recipients
                .saturating_add(u64::from(recipients));
            counted = true;
        }
        Ok(Reservation {
            key: key.clone(),
            recipients,
            counted,
        })
    }

    /// Ends a job begun with [`begin`](Self::begin): it is no longer in flight, and what
    /// the upstream accepted is recorded (see [`record`](Self::record)). Pass 0 when
    /// nothing was sent (every recipient refused, the connection failed, the job was
    /// taken back).
    pub fn finish(&mut self, reservation: Reservation, accepted_recipients: u32, now_unix_ms: u64) {
        if reservation.counted
            && let Some(account) = self.accounts.get_mut(&reservation.key)
        {
            account.in_flight_messages = account.in_flight_messages.saturating_sub(1);
            account.in_flight_recipients = account
                .in_flight_recipients
                .saturating_sub(u64::from(reservation.recipients));
        }
        self.record(&reservation.key, accepted_recipients, now_unix_ms);
    }

    /// Counts one message with `accepted_recipients` recipients that the upstream
    /// accepted (its reply to the content was 2yz). 0 counts nothing: no message went
    /// out. Keys without limits are not counted. When the table is full and `key` is
    /// new, nothing is counted (see [`MAX_TRACKED_ACCOUNTS`] and
    /// [`QuotaStats::untracked_records`]).
    pub fn record(&mut self, key: &QuotaKey, accepted_recipients: u32, now_unix_ms: u64) {
        if accepted_recipients == 0 || (self.limits)(key).is_none() {
            return;
        }
        let now_slot = slot_of(now_unix_ms);
        let Some(account) = self.account_mut(key, now_unix_ms) else {
            return;
        };
        account.advance(now_slot);
        account.add_to_current(Bucket {
            slot: now_slot,
            messages: 1,
            recipients: accepted_recipients,
        });
        self.dirty = true;
    }

    /// Refuses every transaction of `key` until `until_unix_ms` (at most
    /// [`MAX_BLOCK_MS`] from now): the upstream said the account's quota is spent
    /// (`550 5.4.5`), whatever our counts say. A later block extends an earlier one,
    /// never shortens it. Kept in the file.
    pub fn block_until(&mut self, key: &QuotaKey, until_unix_ms: u64, now_unix_ms: u64) {
        let until = until_unix_ms.min(now_unix_ms.saturating_add(MAX_BLOCK_MS));
        if until <= now_unix_ms {
            return;
        }
        let Some(account) = self.account_mut(key, now_unix_ms) else {
            return;
        };
        let current = account.blocked_at(now_unix_ms).unwrap_or(0);
        if until > current {
            account.blocked_until_unix_ms = Some(until);
            self.dirty = true;
        }
    }

    /// Like [`block_until`](Self::block_until) for every account of `upstream`: Google's
    /// per-customer limits (`550 5.7.1 Daily SMTP relay limit exceeded for customer`).
    pub fn block_upstream_until(&mut self, upstream: &str, until_unix_ms: u64, now_unix_ms: u64) {
        let until = until_unix_ms.min(now_unix_ms.saturating_add(MAX_BLOCK_MS));
        if until <= now_unix_ms {
            return;
        }
        let upstream = cut(upstream);
        let current = self
            .upstream_blocks
            .get(upstream)
            .copied()
            .filter(|&current| current > now_unix_ms)
            .unwrap_or(0);
        if until > current {
            self.upstream_blocks.insert(upstream.to_string(), until);
            self.dirty = true;
        }
    }

    /// Every tracked account, in key order.
    pub fn status(&self, now_unix_ms: u64) -> Vec<QuotaStatus> {
        let now_slot = slot_of(now_unix_ms);
        self.accounts
            .iter()
            .map(|(key, account)| {
                let (messages_used, recipients_used) = account.used(now_slot);
                QuotaStatus {
                    key: key.clone(),
                    limits: (self.limits)(key),
                    messages_used,
                    recipients_used,
                    messages_in_flight: account.in_flight_messages,
                    recipients_in_flight: account.in_flight_recipients,
                    blocked_until_unix_ms: account.blocked_at(now_unix_ms),
                    next_message: self.check(key, 1, now_unix_ms),
                }
            })
            .collect()
    }

    /// Blocks on whole upstreams still in force: upstream name and until when.
    pub fn upstream_blocks(&self, now_unix_ms: u64) -> Vec<(String, u64)> {
        self.upstream_blocks
            .iter()
            .filter(|&(_, &until)| until > now_unix_ms)
            .map(|(upstream, &until)| (upstream.clone(), until))
            .collect()
    }

    pub fn stats(&self) -> QuotaStats {
        QuotaStats {
            tracked_accounts: self.accounts.len(),
            untracked_records: self.untracked_records,
        }
    }

    /// Whether the file is behind: something was recorded or blocked since the last
    /// snapshot. (Time passing alone does not make it dirty: `load` drops old buckets.)
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// For a caller whose write of a [`snapshot`](Self::snapshot) failed: the next save
    /// must happen.
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Forgets accounts with nothing counted, nothing in flight and no block, and
    /// accounts that no longer have limits (configuration changed) unless in flight or
    /// blocked; drops buckets that left the window. Called by `snapshot`.
    pub fn prune(&mut self, now_unix_ms: u64) {
        let now_slot = slot_of(now_unix_ms);
        let limits = &self.limits;
        self.accounts.retain(|key, account| {
            account.advance(now_slot);
            if account.blocked_at(now_unix_ms).is_none() {
                account.blocked_until_unix_ms = None;
            }
            if limits(key).is_none() {
                account.buckets.clear();
            }
            !account.is_idle(now_unix_ms)
        });
        self.upstream_blocks.retain(|_, until| *until > now_unix_ms);
    }

    /// The file's content as of now, and the dirty flag cleared. For a caller that
    /// writes it on another thread ([`QuotaSnapshot::write_atomically`]); it calls
    /// [`mark_dirty`](Self::mark_dirty) if that fails.
    pub fn snapshot(&mut self, now_unix_ms: u64) -> QuotaSnapshot {
        self.prune(now_unix_ms);
        let file = QuotaFile {
            format: FORMAT_NAME.to_string(),
            version: FORMAT_VERSION,
            saved_at_unix_ms: now_unix_ms,
            bucket_ms: BUCKET_MS,
            upstream_blocks: self
                .upstream_blocks
                .iter()
                .map(|(upstream, &until)| FileUpstreamBlock {
                    upstream: upstream.clone(),
                    blocked_until_unix_ms: until,
                })
                .collect(),
            accounts: self
                .accounts
                .iter()
                .map(|(key, account)| FileAccount {
                    upstream: key.upstream.clone(),
                    account: key.account.clone(),
                    blocked_until_unix_ms: account.blocked_until_unix_ms,
                    buckets: account
                        .buckets
                        .iter()
                        .map(|bucket| {
                            (
                                bucket.slot.saturating_mul(BUCKET_MS),
                                bucket.messages,
                                bucket.recipients,
                            )
                        })
                        .collect(),
                })
                .collect(),
        };
        self.dirty = false;
        QuotaSnapshot { file }
    }

    /// Snapshot and write in one, on this thread (two fsyncs). On failure the file on
    /// disk is the previous one and the counts stay dirty.
    pub fn save(&mut self, path: &Path, now_unix_ms: u64) -> Result<(), QuotaSaveError> {
        let snapshot = self.snapshot(now_unix_ms);
        let result = snapshot.write_atomically(path);
        if result.is_err() {
            self.dirty = true;
        }
        result
    }

    /// Restores the counts saved at `path`, dropping what left the window by
    /// `now_unix_ms`. Never fails: a missing file starts from zero, and an unreadable,
    /// corrupt, oversized or unknown-version file starts from zero with a warning (the
    /// next save replaces it).
    pub fn load(
        path: &Path,
        limits: impl Fn(&QuotaKey) -> Option<QuotaLimits> + Send + 'static,
        now_unix_ms: u64,
    ) -> (Self, LoadOutcome) {
        let mut quotas = Self::new(limits);
        let outcome = match read_limited(path) {
            Ok(None) => {
                tracing::info!(path = %path.display(), "no quota file yet: sending quotas count from zero");
                LoadOutcome::Missing
            }
            Ok(Some(bytes)) => match decode(&bytes, now_unix_ms) {
                Ok(decoded) => {
                    quotas.accounts = decoded.accounts;
                    quotas.upstream_blocks = decoded.upstream_blocks;
                    tracing::info!(
                        path = %path.display(),
                        accounts = quotas.accounts.len(),
                        "sending quotas restored"
                    );
                    LoadOutcome::Loaded {
                        accounts: quotas.accounts.len(),
                    }
                }
                Err(reason) => LoadOutcome::Discarded { reason },
            },
            Err(reason) => LoadOutcome::Discarded { reason },
        };
        if let LoadOutcome::Discarded { reason } = &outcome {
            tracing::warn!(
                path = %path.display(),
                reason,
                "the quota file is unusable and is ignored: sending quotas count from zero, so until a day has passed an upstream may refuse mail over its quota (that mail is deferred, not lost)"
            );
            quotas.dirty = true;
        }
        (quotas, outcome)
    }

    /// The account of `key`, created if new and there is room (after forgetting idle
    /// accounts if the table is full).
    fn account_mut(&mut self, key: &QuotaKey, now_unix_ms: u64) -> Option<&mut Account> {
        if !self.accounts.contains_key(key) && self.accounts.len() >= MAX_TRACKED_ACCOUNTS {
            self.prune(now_unix_ms);
            if self.accounts.len() >= MAX_TRACKED_ACCOUNTS {
                self.untracked_records += 1;
                if self.untracked_records.is_power_of_two() {
                    tracing::warn!(
                        tracked = self.accounts.len(),
                        untracked_records = self.untracked_records,
                        "the quota table is full: transactions of new accounts are not counted against their quota"
                    );
                }
                return None;
            }
        }
        Some(self.accounts.entry(key.clone()).or_default())
    }
}

/// Whether `amount` more fits under `allowed`, given the counted buckets (`(slot,
/// count)`, oldest first) and what is in flight. `None` if it fits, else what is used and
/// when it would fit (`None`: never).
fn refusal(
    counted: impl Iterator<Item = (u64, u32)> + Clone,
    in_flight: u64,
    amount: u32,
    allowed: u32,
    now_slot: u64,
) -> Option<(u64, Option<u64>)> {
    let recorded: u64 = counted.clone().map(|(_, count)| u64::from(count)).sum();
    let used = recorded.saturating_add(in_flight);
    let amount = u64::from(amount);
    let allowed = u64::from(allowed);
    if used.saturating_add(amount) <= allowed {
        return None;
    }
    if amount > allowed {
        return Some((used, None));
    }
    let excess = used + amount - allowed;
    let mut freed = 0u64;
    for (slot, count) in counted {
        freed += u64::from(count);
        if freed >= excess {
            return Some((used, Some(leaves_at_unix_ms(slot))));
        }
    }
    // Only the transactions in flight stand in the way: once accepted they count from
    // now on.
    Some((used, Some(leaves_at_unix_ms(now_slot))))
}

/// A quota file ready to be written.
#[derive(Debug, Clone)]
pub struct QuotaSnapshot {
    file: QuotaFile,
}

impl QuotaSnapshot {
    /// The file's bytes: one line of JSON and a newline.
    pub fn to_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut bytes = serde_json::to_vec(&self.file)?;
        bytes.push(b'\n');
        Ok(bytes)
    }

    /// Writes the file so that a crash at any point leaves either the previous file or
    /// this one, never a mixture: into `<path>.tmp` (mode 0600), fsync, rename over
    /// `path`, fsync the directory (spool-format/quotas.md, "Crash analysis").
    pub fn write_atomically(&self, path: &Path) -> Result<(), QuotaSaveError> {
        let error = |step: &'static str| {
            move |source: std::io::Error| QuotaSaveError {
                path: path.to_path_buf(),
                step,
                source,
            }
        };
        let bytes = self.to_bytes().map_err(|source| QuotaSaveError {
            path: path.to_path_buf(),
            step: "encoding",
            source: source.into(),
        })?;
        let temporary = temporary_path(path);
        if let Err(error) = write_and_rename(&temporary, path, &bytes) {
            let _ = std::fs::remove_file(&temporary);
            return Err(error);
        }
        let directory = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        std::fs::File::open(directory)
            .and_then(|directory| directory.sync_all())
            .map_err(error("syncing the directory"))
    }
}

/// Writes and syncs `temporary`, then renames it to `path`.
fn write_and_rename(temporary: &Path, path: &Path, bytes: &[u8]) -> Result<(), QuotaSaveError> {
    let error = |step: &'static str| {
        move |source: std::io::Error| QuotaSaveError {
            path: path.to_path_buf(),
            step,
            source,
        }
    };
    let mut file = open_private(temporary).map_err(error("creating the temporary file"))?;
    file.write_all(bytes).map_err(error("writing"))?;
    file.sync_all().map_err(error("syncing"))?;
    std::fs::rename(temporary, path).map_err(error("renaming"))
}

/// `quotas.json` → `quotas.json.tmp`, beside it.
fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Account names are mail addresses: private like the spool (spool-format/).
        options.mode(0o600);
    }
    options.open(path)
}

/// The file's bytes, `None` if there is no file, or why it cannot be read.
fn read_limited(path: &Path) -> Result<Option<Vec<u8>>, String> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(format!("cannot open it: {error}")),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| format!("cannot read it: {error}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("it is larger than {MAX_FILE_BYTES} bytes"));
    }
    Ok(Some(bytes))
}

/// What a file restores.
#[derive(Debug, Default)]
struct Decoded {
    accounts: BTreeMap<QuotaKey, Account>,
    upstream_blocks: BTreeMap<String, u64>,
}

/// Enough of the file to tell whether the rest can be read.
#[derive(Deserialize)]
struct FileHeader {
    format: String,
    version: u32,
}

/// Version 1 of the file (spool-format/quotas.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct QuotaFile {
    format: String,
    version: u32,
    saved_at_unix_ms: u64,
    bucket_ms: u64,
    #[serde(default)]
    upstream_blocks: Vec<FileUpstreamBlock>,
    accounts: Vec<FileAccount>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileUpstreamBlock {
    upstream: String,
    blocked_until_unix_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileAccount {
    upstream: String,
    account: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    blocked_until_unix_ms: Option<u64>,
    /// `[start_unix_ms, messages, recipients]`, oldest first.
    buckets: Vec<(u64, u32, u32)>,
}

/// Parses and validates a file and keeps what still counts at `now_unix_ms`.
fn decode(bytes: &[u8], now_unix_ms: u64) -> Result<Decoded, String> {
    let header: FileHeader = serde_json::from_slice(bytes)
        .map_err(|error| format!("it is not a quota file: {error}"))?;
    if header.format != FORMAT_NAME {
        return Err(format!(
            "its format is {:?}, not {FORMAT_NAME:?}",
            header.format
        ));
    }
    if header.version != FORMAT_VERSION {
        return Err(format!(
            "it has version {}, and this tsubame reads only version {FORMAT_VERSION}",
            header.version
        ));
    }
    let file: QuotaFile =
        serde_json::from_slice(bytes).map_err(|error| format!("it is damaged: {error}"))?;
    if file.bucket_ms == 0 || file.bucket_ms > WINDOW_MS {
        return Err(format!(
            "its bucket length {} ms is not between 1 ms and a day",
            file.bucket_ms
        ));
    }
    if file.accounts.len() > MAX_TRACKED_ACCOUNTS {
        return Err(format!(
            "it has {} accounts, more than the {MAX_TRACKED_ACCOUNTS} tsubame tracks",
            file.accounts.len()
        ));
    }
    let now_slot = slot_of(now_unix_ms);
    let mut decoded = Decoded::default();
    for entry in file.accounts {
        let key = QuotaKey::new(&entry.upstream, &entry.account);
        let account = decoded.accounts.entry(key).or_default();
        let mut buckets: BTreeMap<u64, Bucket> = account
            .buckets
            .drain(..)
            .map(|bucket| (bucket.slot, bucket))
            .collect();
        for (start_unix_ms, messages, recipients) in entry.buckets {
            // A bucket of another length goes into our bucket holding its last
            // millisecond: it then counts at least as long as it should.
            let last_unix_ms = start_unix_ms.saturating_add(file.bucket_ms - 1);
            let slot = slot_of(last_unix_ms);
            let bucket = Bucket {
                slot,
                messages,
                recipients,
            };
            buckets
                .entry(slot)
                .and_modify(|sum| *sum = merge(*sum, bucket))
                .or_insert(bucket);
        }
        account.buckets = buckets.into_values().collect();
        account.advance(now_slot);
        let blocked = entry
            .blocked_until_unix_ms
            .filter(|&until| until > now_unix_ms)
            .map(|until| until.min(now_unix_ms.saturating_add(MAX_BLOCK_MS)));
        account.blocked_until_unix_ms = account.blocked_until_unix_ms.max(blocked);
    }
    decoded
        .accounts
        .retain(|_, account| !account.is_idle(now_unix_ms));
    for block in file.upstream_blocks {
        if block.blocked_until_unix_ms > now_unix_ms {
            let until = block
                .blocked_until_unix_ms
                .min(now_unix_ms.saturating_add(MAX_BLOCK_MS));
            let entry = decoded
                .upstream_blocks
                .entry(cut(&block.upstream).to_string())
                .or_insert(0);
            *entry = (*entry).max(until);
        }
    }
    Ok(decoded)
}

/// The quotas the workers share, with their file: saved at most every
/// [`SAVE_INTERVAL`] while something changed, at once after a block, and at shutdown.
#[derive(Debug)]
pub(crate) struct QuotaBook {
    quotas: std::sync::Mutex<Quotas>,
    path: std::path::PathBuf,
    last_save: std::sync::Mutex<std::time::Instant>,
}

/// A job counted as in flight in a [`QuotaBook`]. [`finish`](Self::finish) records what
/// the upstream accepted; dropped unfinished (the delivery panicked, and the worker
/// defers the job), it is finished with nothing accepted, so that `begin` and `finish`
/// always pair: a lost reservation would hold the account's quota until the process
/// ends. The deferred recipients are counted when a later attempt sends them.
#[must_use = "a job counts as in flight until it is finished"]
#[derive(Debug)]
pub(crate) struct InFlight<'book> {
    book: &'book QuotaBook,
    /// `Some` until finished.
    reservation: Option<Reservation>,
}

impl InFlight<'_> {
    pub fn finish(mut self, accepted_recipients: u32, now_unix_ms: u64) {
        if let Some(reservation) = self.reservation.take() {
            self.book
                .finish(reservation, accepted_recipients, now_unix_ms);
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(reservation) = self.reservation.take() {
            self.book.finish(reservation, 0, crate::now_unix_ms());
        }
    }
}

/// How often the quota file is rewritten at most while mail flows.
pub(crate) const SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

impl QuotaBook {
    pub fn new(quotas: Quotas, path: std::path::PathBuf) -> Self {
        Self {
            quotas: std::sync::Mutex::new(quotas),
            path,
            last_save: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Quotas> {
        self.quotas
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a job as in flight (see [`Quotas::begin`]) until the returned guard is
    /// finished or dropped.
    pub fn begin(
        &self,
        key: &QuotaKey,
        recipients: u32,
        now_unix_ms: u64,
    ) -> Result<InFlight<'_>, QuotaExhausted> {
        let reservation = self.lock().begin(key, recipients, now_unix_ms)?;
        Ok(InFlight {
            book: self,
            reservation: Some(reservation),
        })
    }

    fn finish(&self, reservation: Reservation, accepted_recipients: u32, now_unix_ms: u64) {
        self.lock()
            .finish(reservation, accepted_recipients, now_unix_ms);
    }

    pub fn block_until(&self, key: &QuotaKey, until_unix_ms: u64, now_unix_ms: u64) {
        self.lock().block_until(key, until_unix_ms, now_unix_ms);
        self.save_now();
    }

    pub fn block_upstream_until(&self, upstream: &str, until_unix_ms: u64, now_unix_ms: u64) {
        self.lock()
            .block_upstream_until(upstream, until_unix_ms, now_unix_ms);
        self.save_now();
    }

    /// Saves when something changed and the last save is [`SAVE_INTERVAL`] old.
    pub fn save_if_due(&self) {
        let due = self
            .last_save
            .lock()
            .map(|last| last.elapsed() >= SAVE_INTERVAL)
            .unwrap_or(true);
        if due && self.lock().is_dirty() {
            self.save_now();
        }
    }

    /// Saves now if anything changed since the last save.
    pub fn save_now(&self) {
        let snapshot = {
            let mut quotas = self.lock();
            if !quotas.is_dirty() {
                return;
            }
            quotas.snapshot(crate::now_unix_ms())
        };
        if let Ok(mut last) = self.last_save.lock() {
            *last = std::time::Instant::now();
        }
        if let Err(error) = snapshot.write_atomically(&self.path) {
            tracing::error!(%error, "cannot save the sending quotas; they are kept in memory and saved again later");
            self.lock().mark_dirty();
        }
    }
}
