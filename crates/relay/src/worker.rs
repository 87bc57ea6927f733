//! Delivery workers: plain threads, `max_connections` per upstream, fed by that
//! upstream's job queue (an `Inbox`). Each keeps at most one connection open and reuses it
//! for the next job to the same address (RSET between, in the client state machine),
//! up to `max_messages_per_connection`, closing it after `idle_timeout_secs` without
//! work. Blocking I/O is fine here: every wait has a timeout, and the event loop never
//! waits on a worker.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Instant;

use tsubame_config::UpstreamKind;
use tsubame_delivery::{
    Credentials, DeliveryError, LocalFailure, Message, Reason, RecipientOutcome, Reply,
    UpstreamConnection,
};
use tsubame_queue::Outcome;
use tsubame_spool::Spool;

use crate::dispatcher::Input;
use crate::inbox::{Inbox, Pop};
use crate::job::{RecipientReport, Report, WorkItem};
use crate::now_unix_ms;
use crate::quota::{QuotaBook, QuotaExhausted, QuotaKey};
use crate::routing::domain_of;
use crate::tokens::TokenFailure;
use crate::upstream::Upstream;
use tsubame_delivery::reply_class::{QuotaScope, RateScope, UpstreamSignal, classify_reply};

/// What every worker shares.
#[derive(Debug)]
pub(crate) struct WorkerContext {
    pub spool: Spool,
    /// The dispatcher's inbox, for reports.
    pub reports: Arc<Inbox<Input>>,
    /// The upstreams in force, for sending through an upstream's `fallback`.
    pub upstreams: Arc<crate::upstream::ActiveUpstreams>,
    /// Daily quotas per upstream account, shared by all workers.
    pub quotas: Arc<QuotaBook>,
}

/// An open connection and how much it has carried.
#[derive(Debug)]
struct Cached {
    connection: UpstreamConnection,
    messages_sent: usize,
    /// The host name it was opened for (the smarthost's, or the MX host's).
    target: String,
    /// The account it logged in as, for upstreams with a login per account.
    account: Option<String>,
}

/// Accounts a worker keeps a connection open for at once (OAuth upstreams log in per
/// account): jobs for two or three accounts interleaved on one upstream reuse their
/// connections instead of logging in again for every other message (measured: two
/// accounts on one connection each took a login per 2 messages).
const ACCOUNTS_PER_WORKER: usize = 4;

/// A slot: the account (`None` for upstreams without per-account logins) and its
/// open connection, if any.
type Slot = (Option<String>, Option<Cached>);

/// A worker's open connections, one per account at most.
#[derive(Debug, Default)]
struct Connections {
    /// The most recently used slot: for an upstream with one login (every smarthost
    /// without OAuth) the only one, found without moving anything.
    current: Option<Slot>,
    /// The others, least recently used first.
    older: Vec<Slot>,
}

impl Connections {
    /// The slot for `account`, made (closing the least recently used one when full)
    /// when there is none; it becomes the most recently used.
    fn slot(&mut self, account: Option<&str>) -> &mut Option<Cached> {
        let entry = match self.current.take() {
            Some(entry) if entry.0.as_deref() == account => entry,
            previous => {
                let found = self
                    .older
                    .iter()
                    .position(|(slot_account, _)| slot_account.as_deref() == account)
                    .map(|position| self.older.remove(position));
                let entry = found.unwrap_or_else(|| {
                    let open = self.older.len() + usize::from(previous.is_some());
                    if open >= ACCOUNTS_PER_WORKER && !self.older.is_empty() {
                        let (_, mut oldest) = self.older.remove(0);
                        close(&mut oldest);
                    }
                    (account.map(str::to_string), None)
                });
                if let Some(previous) = previous {
                    self.older.push(previous);
                }
                entry
            }
        };
        &mut self.current.insert(entry).1
    }

    fn close_all(&mut self) {
        for (_, cached) in self.current.iter_mut().chain(self.older.iter_mut()) {
            close(cached);
        }
        self.forget_all();
    }

    /// Drops every connection without QUIT (their state is unknown).
    fn forget_all(&mut self) {
        self.current = None;
        self.older.clear();
    }
}

/// Runs one worker until its channel closes.
pub(crate) fn run(
    upstream: Arc<Upstream>,
    jobs: Arc<Inbox<WorkItem>>,
    context: Arc<WorkerContext>,
) {
    let mut connections = Connections::default();
    loop {
        match jobs.pop_timeout(upstream.idle_timeout()) {
            Pop::Item(item) => {
                let started = Instant::now();
                // A bug in one delivery must not leave its job in flight forever: the
                // recipients are deferred, the connection dropped, the worker goes on.
                let report = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    deliver(&upstream, &context, &mut connections, &item)
                })) {
                    Ok(report) => report,
                    Err(_) => {
                        connections.forget_all();
                        tracing::error!(id = %item.meta.message.id, upstream = upstream.name(), "delivery panicked; the recipients are deferred");
                        report_all(
                            &upstream,
                            &item,
                            Outcome::Deferred,
                            "local error in the delivery thread",
                            "4.3.0",
                        )
                    }
                };
                let report = Report {
                    attempt_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    ..report
                };
                if context.reports.push(Input::Report(report)).is_err() {
                    break;
                }
            }
            Pop::Timeout => connections.close_all(),
            Pop::Closed => break,
        }
    }
    connections.close_all();
}

fn close(cached: &mut Option<Cached>) {
    if let Some(cached) = cached.take() {
        let address = cached.connection.address();
        if let Err(error) = cached.connection.quit() {
            tracing::debug!(%address, %error, "closing an idle connection");
        }
    }
}

/// Sends one job through `upstream`, and through its `fallback` what the upstream
/// cannot take now: an account at its daily quota, or the upstream's own quota and
/// rate-limit replies (which never bounce, even as 5yz).
fn deliver(
    upstream: &Upstream,
    context: &WorkerContext,
    connections: &mut Connections,
    item: &WorkItem,
) -> Report {
    let message = &item.meta.message;
    let account = upstream.account_for(message.authenticated_user.as_deref(), &message.mail_from);
    let cached = connections.slot(account);
    let key = upstream.quota_limits().map(|_| {
        QuotaKey::new(
            upstream.name(),
            &upstream
                .config
                .quota_account(message.authenticated_user.as_deref(), &message.mail_from),
        )
    });
    let Some(key) = key else {
        let mut report = deliver_here(upstream, context, cached, item);
        spill(upstream, context, item, &mut report);
        return report;
    };
    let recipients = u32::try_from(item.recipients.len()).unwrap_or(u32::MAX);
    let reservation = match context.quotas.begin(&key, recipients, now_unix_ms()) {
        Ok(reservation) => reservation,
        Err(exhausted) => {
            let why = quota_text(upstream, &key, &exhausted);
            let mut report = report_all(upstream, item, Outcome::Deferred, &why, "4.7.0");
            for recipient in &mut report.recipients {
                recipient.spill = true;
            }
            if !spill(upstream, context, item, &mut report) {
                tracing::info!(
                    upstream = upstream.name(),
                    account = key.account(),
                    reason = why,
                    "daily quota reached; the mail waits"
                );
            }
            return report;
        }
    };
    let mut report = deliver_here(upstream, context, cached, item);
    let accepted = report
        .recipients
        .iter()
        .filter(|recipient| recipient.outcome == Outcome::Delivered)
        .count();
    reservation.finish(u32::try_from(accepted).unwrap_or(u32::MAX), now_unix_ms());
    spill(upstream, context, item, &mut report);
    context.quotas.save_if_due();
    report
}

/// Sends the recipients of `report` that `upstream` deferred because of its quota or
/// rate limits through the upstream's `fallback`, now, and puts their outcomes in the
/// report. Returns whether a fallback took them.
fn spill(
    upstream: &Upstream,
    context: &WorkerContext,
    item: &WorkItem,
    report: &mut Report,
) -> bool {
    // Most upstreams have no fallback, and most reports nothing to spill: neither
    // costs a scan of the recipients then.
    let Some(fallback_name) = upstream.config.fallback.as_deref() else {
        return false;
    };
    if !report.recipients.iter().any(|reported| reported.spill) {
        return false;
    }
    let waiting: Vec<(tsubame_queue::RecipientIndex, u32)> = item
        .recipients
        .iter()
        .copied()
        .filter(|(recipient, _)| {
            report
                .recipients
                .iter()
                .any(|reported| reported.recipient == *recipient && reported.spill)
        })
        .collect();
    if waiting.is_empty() {
        return false;
    }
    let Some(fallback) = context.upstreams.find(fallback_name) else {
        return false;
    };
    let fallback = &*fallback;
    tracing::info!(
        id = %item.meta.message.id,
        upstream = upstream.name(),
        fallback = fallback.name(),
        recipients = waiting.len(),
        "the upstream cannot take this mail now; sending it through the fallback"
    );
    let through_item = WorkItem {
        job: item.job,
        meta: Arc::clone(&item.meta),
        recipients: waiting,
    };
    // Its own connection, closed after: the worker's open connection is this upstream's.
    let mut connection = None;
    // A panic here must not reach the worker's catch-all, which would defer the whole
    // job, the recipients the primary already delivered too (they would go out twice):
    // only the spilled ones stay deferred.
    let through = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        deliver_here(fallback, context, &mut connection, &through_item)
    }));
    let through = match through {
        Ok(through) => {
            close(&mut connection);
            through
        }
        Err(_) => {
            tracing::error!(id = %item.meta.message.id, fallback = fallback.name(), "delivery through the fallback panicked; its recipients stay deferred");
            return false;
        }
    };
    for outcome in through.recipients {
        if let Some(slot) = report
            .recipients
            .iter_mut()
            .find(|reported| reported.recipient == outcome.recipient)
        {
            *slot = RecipientReport {
                remote: Some(format!(
                    "{} (fallback {})",
                    outcome.remote.as_deref().unwrap_or("-"),
                    fallback.name()
                )),
                spill: false,
                ..outcome
            };
        }
    }
    true
}

fn quota_text(upstream: &Upstream, key: &QuotaKey, exhausted: &QuotaExhausted) -> String {
    let until = exhausted.until_unix_ms.map_or_else(
        || "; the job must be sent in smaller parts".to_string(),
        |until| {
            format!(
                "; room again in {} s",
                until.saturating_sub(now_unix_ms()).div_ceil(1000)
            )
        },
    );
    format!(
        "daily sending quota of {} at upstream {} reached ({:?}){until}",
        key.account(),
        upstream.name(),
        exhausted.which
    )
}

/// A recipient's report, with what the reply says about the upstream's limits: a
/// quota or rate-limit reply defers (never bounces), blocks the account or upstream for
/// a while, and marks the recipient for the fallback.
fn with_signal(
    upstream: &Upstream,
    context: &WorkerContext,
    account: &dyn Fn() -> String,
    mut report: RecipientReport,
    outcome: &RecipientOutcome,
) -> RecipientReport {
    let reply = match outcome {
        RecipientOutcome::Deferred(Reason::Reply { reply, .. })
        | RecipientOutcome::Failed(Reason::Reply { reply, .. }) => reply,
        _ => return report,
    };
    let signal = classify_reply(reply);
    if signal.defers() {
        heed(upstream, context, account, signal);
        report.outcome = Outcome::Deferred;
        report.spill = !matches!(
            signal,
            UpstreamSignal::TooManyRecipients
                | UpstreamSignal::RateLimited {
                    scope: RateScope::Recipient,
                    ..
                }
        );
    }
    report
}

/// Acts on what an upstream's reply says about its limits: blocks the account or the
/// upstream for the reply's hint, so that the next jobs wait (or spill) without asking.
fn heed(
    upstream: &Upstream,
    context: &WorkerContext,
    account: &dyn Fn() -> String,
    signal: UpstreamSignal,
) {
    let now = now_unix_ms();
    match signal {
        UpstreamSignal::QuotaExceeded {
            scope: QuotaScope::Account,
            retry_after_hint,
        } => {
            let account = account();
            let key = QuotaKey::new(upstream.name(), &account);
            let until = now.saturating_add(retry_after_hint.as_millis() as u64);
            context.quotas.block_until(&key, until, now);
            tracing::warn!(
                upstream = upstream.name(),
                account = account.as_str(),
                "the upstream says the account's daily quota is spent"
            );
        }
        UpstreamSignal::QuotaExceeded {
            scope: QuotaScope::Upstream,
            retry_after_hint,
        }
        | UpstreamSignal::RateLimited {
            scope: RateScope::Upstream,
            retry_after_hint,
        } => {
            let until = now.saturating_add(retry_after_hint.as_millis() as u64);
            context
                .quotas
                .block_upstream_until(upstream.name(), until, now);
            tracing::warn!(
                upstream = upstream.name(),
                ?signal,
                "the upstream asks us to slow down"
            );
        }
        UpstreamSignal::RateLimited {
            scope: RateScope::Recipient,
            ..
        }
        | UpstreamSignal::TooManyRecipients
        | UpstreamSignal::Normal => {}
    }
}

fn deliver_here(
    upstream: &Upstream,
    context: &WorkerContext,
    cached: &mut Option<Cached>,
    item: &WorkItem,
) -> Report {
    let started = Instant::now();
    let message = &item.meta.message;
    let body = match crate::body::load(&context.spool, message) {
        Ok(body) => body,
        Err(error) => {
            // The record was readable at start or when accepted; a failure now is a disk
            // problem. Defer: the next attempt reads it again.
            tracing::error!(id = %message.id, %error, "cannot read the message body from the spool");
            return report_all(
                upstream,
                item,
                Outcome::Deferred,
                &format!("local error reading the spool: {error}"),
                "4.3.0",
            );
        }
    };
    // Without its stored signature the message still goes, unsigned: retrying would not
    // bring an unreadable record back, and the body is what was promised.
    let added = crate::body::added_fields(&context.spool, &item.meta).unwrap_or_else(|error| {
        tracing::error!(id = %message.id, %error, "cannot read the message's stored DKIM signature; it is sent unsigned");
        crate::body::Added::None
    });
    let mut results: Vec<RecipientReport> = Vec::with_capacity(item.recipients.len());
    // An address the client cannot put on a command line fails on its own (RFC 3463
    // 5.1.3, or 5.1.7 for the sender), instead of taking its whole transaction with it.
    if !tsubame_delivery::client::valid_address(&message.mail_from, true) {
        return report_all(
            upstream,
            item,
            Outcome::Failed,
            "the sender address cannot be sent in a MAIL command",
            "5.1.7",
        );
    }
    // The account the session logs in as (OAuth upstreams; one per message).
    let account = upstream.account_for(message.authenticated_user.as_deref(), &message.mail_from);
    // Whose quota a reply speaks of: worked out only when a reply speaks of one.
    let account_text = || {
        upstream
            .config
            .quota_account(message.authenticated_user.as_deref(), &message.mail_from)
    };
    let report_outcomes = |results: &mut Vec<RecipientReport>,
                           recipients: &[tsubame_queue::RecipientIndex],
                           outcomes: Vec<RecipientOutcome>,
                           remote: &str,
                           tls: Option<&str>| {
        for (recipient, outcome) in recipients.iter().zip(outcomes) {
            let report = recipient_report(*recipient, &outcome, remote, tls);
            results.push(with_signal(
                upstream,
                context,
                &account_text,
                report,
                &outcome,
            ));
        }
    };
    // Recipients per destination: one group for a smarthost, one per domain for MX.
    let mut groups: BTreeMap<String, Vec<tsubame_queue::RecipientIndex>> = BTreeMap::new();
    for &(recipient, _attempt) in &item.recipients {
        let address = message
            .recipients
            .get(recipient.0 as usize)
            .map_or("", String::as_str);
        if !tsubame_delivery::client::valid_address(address, false) {
            results.push(RecipientReport {
                recipient,
                outcome: Outcome::Failed,
                detail: "the recipient address cannot be sent in a RCPT command".to_string(),
                status: "5.1.3".to_string(),
                remote: None,
                tls: None,
                spill: false,
            });
            continue;
        }
        let key = if upstream.config.kind.is_relay() {
            String::new()
        } else {
            domain_of(address).unwrap_or("").to_ascii_lowercase()
        };
        groups.entry(key).or_default().push(recipient);
    }
    for (domain, recipients) in groups {
        // The common case, one job for all of a message's recipients in order, borrows
        // the message's own list; otherwise the group's addresses are copied once.
        let whole = recipients.len() == message.recipients.len()
            && recipients
                .iter()
                .enumerate()
                .all(|(position, recipient)| recipient.0 as usize == position);
        let copied: Vec<String>;
        let addresses: &[String] = if whole {
            &message.recipients
        } else {
            copied = recipients
                .iter()
                .filter_map(|recipient| message.recipients.get(recipient.0 as usize).cloned())
                .collect();
            &copied
        };
        let outgoing = Message {
            mail_from: &message.mail_from,
            recipients: addresses,
            body_type: item.meta.body_type,
            smtputf8: item.meta.smtputf8,
            added_fields: &added,
            body: &body,
        };
        // A smarthost's open connection is used without resolving its name again: a
        // name with rotating addresses (most large relays) would otherwise defeat reuse,
        // and the lookup is a syscall or a DNS query per message.
        if upstream.config.kind.is_relay()
            && let Some(host) = upstream.config.host()
            && let Some((outcomes, tls)) = send_on_cached(upstream, cached, host, account, outgoing)
        {
            report_outcomes(&mut results, &recipients, outcomes, host, tls.as_deref());
            continue;
        }
        let outcome = targets(upstream, &domain).and_then(|targets| {
            send_to_first_reachable(upstream, cached, &targets, account, outgoing)
        });
        match outcome {
            Ok((remote, result, tls)) => {
                report_outcomes(&mut results, &recipients, result, &remote, tls.as_deref());
            }
            Err(failure) => {
                heed(upstream, context, &account_text, failure.signal);
                for recipient in &recipients {
                    results.push(RecipientReport {
                        recipient: *recipient,
                        outcome: failure.outcome,
                        detail: failure.detail.clone(),
                        status: failure.status.to_string(),
                        remote: None,
                        tls: None,
                        spill: failure.signal.defers(),
                    });
                }
            }
        }
    }
    tracing::debug!(
        id = %message.id,
        upstream = upstream.name(),
        recipients = results.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "job finished"
    );
    Report {
        job: item.job,
        message: Arc::clone(&item.meta),
        upstream: upstream.index,
        recipients: results,
        attempt_ms: 0,
        message_id: tsubame_dkim::message_id(&body),
    }
}

/// Why no transaction could be had for a group of recipients.
#[derive(Debug, Clone)]
pub(crate) struct GroupFailure {
    pub outcome: Outcome,
    pub detail: String,
    pub status: &'static str,
    /// What the refusal said about the upstream's limits (`421 4.7.0 Try again later`).
    pub signal: UpstreamSignal,
}

/// A host to try: its name (for TLS and reports) and addresses.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub name: String,
    pub addresses: Vec<SocketAddr>,
}

/// Where to connect for a group, in the order to try.
pub(crate) fn targets(upstream: &Upstream, domain: &str) -> Result<Vec<Target>, GroupFailure> {
    let port = upstream.config.port_number();
    match upstream.config.kind {
        UpstreamKind::Mx => crate::mx::targets(upstream, domain, port),
        UpstreamKind::Smtp | UpstreamKind::Gmail | UpstreamKind::GoogleRelay => {
            let host = upstream.config.host().unwrap_or_default().to_string();
            let addresses: Vec<SocketAddr> = (host.as_str(), port)
                .to_socket_addrs()
                .map_err(|error| GroupFailure {
                    outcome: Outcome::Deferred,
                    detail: format!("cannot resolve {host}: {error}"),
                    status: "4.4.3",
                    signal: UpstreamSignal::Normal,
                })?
                .collect();
            Ok(vec![Target {
                name: host,
                addresses,
            }])
        }
    }
}

/// Tries per address: a reused connection that turns out to have been closed by the
/// upstream meanwhile (idle timeout, restart) fails before the content goes out, and then
/// one fresh connection gets the message at once.
const TRIES_PER_ADDRESS: usize = 2;

/// What one send on the open connection came to.
enum Sent {
    /// The transaction ran; its outcomes stand. With the connection's TLS version and
    /// cipher suite when it was encrypted.
    Outcomes(Vec<RecipientOutcome>, Option<String>),
    /// A reused connection had been closed by the upstream before the content went out:
    /// nothing was delivered; the connection is dropped and a new one may be tried.
    Stale,
    /// Nothing was sent (the connection was unusable, or the envelope is invalid).
    Refused(DeliveryError),
}

/// Sends `message` on the open connection in `cached` (which must be `Some`).
fn send_on_open(cached: &mut Option<Cached>, message: Message<'_>) -> Sent {
    let Some(open) = cached.as_mut() else {
        return Sent::Stale;
    };
    let reused = open.messages_sent > 0;
    // Asked before sending: a connection the transaction ends is gone after it.
    let tls = open.connection.tls_summary();
    match open.connection.send(message) {
        Ok(result) => {
            open.messages_sent += 1;
            if !open.connection.is_usable() {
                *cached = None;
            }
            let stale = reused
                && !result.content_sent
                && cached.is_none()
                && result.outcomes.iter().all(|outcome| {
                    matches!(
                        outcome,
                        RecipientOutcome::Deferred(Reason::Local(
                            LocalFailure::ConnectionLost { .. }
                        ))
                    )
                });
            if stale {
                Sent::Stale
            } else {
                Sent::Outcomes(result.outcomes, tls)
            }
        }
        Err(error) => {
            *cached = None;
            Sent::Refused(error)
        }
    }
}

/// May the open connection carry another message to `matches`' destination?
fn reusable(
    upstream: &Upstream,
    cached: &Option<Cached>,
    matches: impl Fn(&Cached) -> bool,
) -> bool {
    cached.as_ref().is_some_and(|cached| {
        matches(cached)
            && cached.connection.is_usable()
            && cached.messages_sent < upstream.config.max_messages_per_connection
    })
}

/// Sends on the open connection if it was opened for `target` and may carry another
/// message. `None` when there is none, or when it turned out stale or refused the
/// message (the caller then opens a new one, which reports any refusal).
fn send_on_cached(
    upstream: &Upstream,
    cached: &mut Option<Cached>,
    target: &str,
    account: Option<&str>,
    message: Message<'_>,
) -> Option<(Vec<RecipientOutcome>, Option<String>)> {
    if !reusable(upstream, cached, |cached| {
        cached.target == target && cached.account.as_deref() == account
    }) {
        return None;
    }
    match send_on_open(cached, message) {
        Sent::Outcomes(outcomes, tls) => Some((outcomes, tls)),
        Sent::Stale | Sent::Refused(_) => None,
    }
}

/// Opens (or reuses) a connection to the first target address that answers and sends
/// the message there. Connection-level failures move on to the next address (RFC 5321
/// §5.1: try the next MX); once a transaction has run, its outcomes stand.
fn send_to_first_reachable(
    upstream: &Upstream,
    cached: &mut Option<Cached>,
    targets: &[Target],
    account: Option<&str>,
    message: Message<'_>,
) -> Result<(String, Vec<RecipientOutcome>, Option<String>), GroupFailure> {
    let mut last_error: Option<DeliveryError> = None;
    // Fetched when a session is first opened; fetched again after the upstream refused
    // an access token, once.
    let mut credentials: Option<Option<Credentials>> = None;
    let mut fresh_token_tried = false;
    for target in targets {
        for &address in &target.addresses {
            for _ in 0..TRIES_PER_ADDRESS {
                if !reusable(upstream, cached, |cached| {
                    cached.connection.address() == address && cached.account.as_deref() == account
                }) {
                    close(cached);
                    let current = match &credentials {
                        Some(current) => current.clone(),
                        None => match upstream.credentials(account) {
                            Ok(fetched) => {
                                credentials = Some(fetched.clone());
                                fetched
                            }
                            Err(failure) => return Err(token_failure(upstream, account, failure)),
                        },
                    };
                    match crate::connect::open(upstream, &target.name, address, current.as_ref()) {
                        Ok(connection) => {
                            if let Some(accepted) = &current {
                                upstream.token_accepted(accepted);
                            }
                            *cached = Some(Cached {
                                connection,
                                messages_sent: 0,
                                target: target.name.clone(),
                                account: account.map(str::to_string),
                            })
                        }
                        Err(error) if error.is_token_rejected() && !fresh_token_tried => {
                            // The token expired or was revoked since it was cached: one
                            // more try with a fresh one (Google answers 535 5.7.8).
                            fresh_token_tried = true;
                            if let Some(rejected) = &current {
                                upstream.token_rejected(rejected);
                            }
                            credentials = None;
                            tracing::info!(upstream = upstream.name(), account, %error, "the upstream refused the access token; trying once more with a fresh one");
                            last_error = Some(error);
                            continue;
                        }
                        Err(error) => {
                            tracing::info!(upstream = upstream.name(), %address, %error, "cannot open a session");
                            last_error = Some(error);
                            break;
                        }
                    }
                }
                match send_on_open(cached, message) {
                    Sent::Outcomes(outcomes, tls) => {
                        return Ok((target.name.clone(), outcomes, tls));
                    }
                    Sent::Stale => {
                        tracing::debug!(upstream = upstream.name(), %address, "reused connection had been closed; trying a new one");
                    }
                    Sent::Refused(error) if error.is_permanent() => {
                        return Err(GroupFailure {
                            outcome: Outcome::Failed,
                            detail: error.to_string(),
                            status: "5.1.3",
                            signal: UpstreamSignal::Normal,
                        });
                    }
                    Sent::Refused(error) => last_error = Some(error),
                }
            }
        }
    }
    // A refusal that speaks of the upstream's limits (`421 4.7.0 Try again later` at
    // the greeting, `454 4.7.0 Too many login attempts`) sends the mail to the fallback.
    let signal = last_error
        .as_ref()
        .and_then(DeliveryError::reply)
        .map_or(UpstreamSignal::Normal, classify_reply);
    Err(GroupFailure {
        outcome: Outcome::Deferred,
        detail: match last_error {
            Some(error) => error.to_string(),
            None => "no address to connect to".to_string(),
        },
        status: "4.4.1",
        signal,
    })
}

/// No token for the session: every recipient of the group waits. A grant that needs
/// authorising again is an operator's job, said loudly with the command to run.
fn token_failure(
    upstream: &Upstream,
    account: Option<&str>,
    failure: TokenFailure,
) -> GroupFailure {
    if failure.needs_authorization {
        // Every queued message of the account hits this at each attempt: said loudly
        // once per GRANT_WARNING_INTERVAL, the rest at debug level.
        if upstream.should_warn_about_grant(account.unwrap_or("")) {
            tracing::error!(
                upstream = upstream.name(),
                account,
                reason = failure.detail,
                "the OAuth grant is invalid or revoked: mail for this account waits until it is authorised again: run tsubame oauth google authorize --account {} (then tsubame queue flush)",
                account.unwrap_or("ACCOUNT")
            );
        } else {
            tracing::debug!(
                upstream = upstream.name(),
                account,
                "no access token: the grant still needs authorising"
            );
        }
    } else {
        tracing::warn!(
            upstream = upstream.name(),
            account,
            reason = failure.detail,
            "no access token"
        );
    }
    GroupFailure {
        outcome: Outcome::Deferred,
        detail: format!(
            "no access token for {}: {}",
            account.unwrap_or("?"),
            failure.detail
        ),
        status: "4.7.0",
        signal: UpstreamSignal::Normal,
    }
}

fn recipient_report(
    recipient: tsubame_queue::RecipientIndex,
    outcome: &RecipientOutcome,
    remote: &str,
    tls: Option<&str>,
) -> RecipientReport {
    let (outcome, reason_text, status) = match outcome {
        RecipientOutcome::Delivered { reply } => (
            Outcome::Delivered,
            reply_text(reply),
            status_of(reply, "2.0.0"),
        ),
        RecipientOutcome::Deferred(reason) => {
            let (text, status) = reason_detail(reason, "4.0.0");
            (Outcome::Deferred, text, status)
        }
        RecipientOutcome::Failed(reason) => {
            let (text, status) = reason_detail(reason, "5.0.0");
            (Outcome::Failed, text, status)
        }
    };
    RecipientReport {
        recipient,
        outcome,
        detail: reason_text,
        status,
        remote: Some(remote.to_string()),
        tls: tls.map(str::to_string),
        spill: false,
    }
}

fn reason_detail(reason: &Reason, default_status: &str) -> (String, String) {
    match reason {
        Reason::Reply { reply, .. } => (reply_text(reply), status_of(reply, default_status)),
        Reason::Local(failure) => {
            let status = match failure {
                // RFC 3463: 5.6.3 conversion required and prohibited / not supported.
                LocalFailure::EightBitMimeNotOffered => "5.6.3",
                // RFC 6531 §3.5: 5.6.7 non-ASCII addresses not permitted.
                LocalFailure::SmtpUtf8NotOffered => "5.6.7",
                // RFC 3463: 5.3.4 message too big for system.
                LocalFailure::MessageTooLarge { .. } => "5.3.4",
                LocalFailure::NoReply | LocalFailure::ConnectionLost { .. } => "4.4.2",
            };
            (local_text(failure), status.to_string())
        }
    }
}

fn local_text(failure: &LocalFailure) -> String {
    match failure {
        LocalFailure::EightBitMimeNotOffered => {
            "the message is 8-bit MIME and the upstream does not offer 8BITMIME".to_string()
        }
        LocalFailure::SmtpUtf8NotOffered => {
            "the message needs SMTPUTF8 and the upstream does not offer it".to_string()
        }
        LocalFailure::MessageTooLarge {
            message_bytes,
            max_message_bytes,
        } => format!(
            "the message ({message_bytes} bytes) is larger than the upstream's limit ({max_message_bytes} bytes)"
        ),
        LocalFailure::NoReply => "the upstream ended the transaction before answering".to_string(),
        LocalFailure::ConnectionLost { detail } => format!("connection lost: {detail}"),
    }
}

/// `550 5.1.1 no such user`, all lines joined by spaces.
pub(crate) fn reply_text(reply: &Reply) -> String {
    let mut text = reply.code.to_string();
    if let Some(enhanced) = reply.enhanced {
        text.push_str(&format!(
            " {}.{}.{}",
            enhanced.class, enhanced.subject, enhanced.detail
        ));
    }
    for line in &reply.lines {
        text.push(' ');
        text.push_str(line);
    }
    text
}

fn status_of(reply: &Reply, default_status: &str) -> String {
    match reply.enhanced {
        Some(enhanced) => format!(
            "{}.{}.{}",
            enhanced.class, enhanced.subject, enhanced.detail
        ),
        None => default_status.to_string(),
    }
}

fn report_all(
    upstream: &Upstream,
    item: &WorkItem,
    outcome: Outcome,
    detail: &str,
    status: &str,
) -> Report {
    Report {
        job: item.job,
        message: Arc::clone(&item.meta),
        upstream: upstream.index,
        recipients: item
            .recipients
            .iter()
            .map(|&(recipient, _)| RecipientReport {
                recipient,
                outcome,
                detail: detail.to_string(),
                status: status.to_string(),
                // Nobody answered: these outcomes are our own.
                remote: None,
                tls: None,
                spill: false,
            })
            .collect(),
        attempt_ms: 0,
        message_id: None,
    }
}

#[cfg(test)]
mod tests {
    use super::{ACCOUNTS_PER_WORKER, Connections};

    fn accounts(connections: &Connections) -> Vec<Option<String>> {
        connections
            .older
            .iter()
            .chain(connections.current.iter())
            .map(|(account, _)| account.clone())
            .collect()
    }

    #[test]
    fn one_login_keeps_one_slot() {
        let mut connections = Connections::default();
        for _ in 0..3 {
            assert!(connections.slot(None).is_none());
        }
        assert_eq!(accounts(&connections), vec![None]);
    }

    #[test]
    fn slots_are_least_recently_used_first_and_the_oldest_goes_when_full() {
        let mut connections = Connections::default();
        let names = ["a", "b", "c", "d", "e"];
        assert_eq!(names.len(), ACCOUNTS_PER_WORKER + 1);
        for name in &names[..ACCOUNTS_PER_WORKER] {
            connections.slot(Some(name));
        }
        // "a" is used again, so "b" is the oldest when "e" comes.
        connections.slot(Some("a"));
        connections.slot(Some("e"));
        let expected: Vec<Option<String>> = ["c", "d", "a", "e"]
            .iter()
            .map(|name| Some((*name).to_string()))
            .collect();
        assert_eq!(accounts(&connections), expected);
        connections.close_all();
        assert!(accounts(&connections).is_empty());
    }
}
