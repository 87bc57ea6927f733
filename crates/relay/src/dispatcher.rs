//! The dispatcher: one thread that owns the scheduler and the table of queued
//! messages. It takes accepted messages from the event loops, hands jobs to the
//! upstreams' workers, journals what comes back, spools bounces, writes message-done
//! records, reclaims spool segments and answers the control socket. Everything that
//! changes queue state happens here, so none of it needs a lock.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use tsubame_queue::{
    Event, Job, MessageKey, Outcome, RecipientIndex, RecoveredRecipient, RetrySchedule, RouteId,
    Scheduler, Timestamp,
};
use tsubame_spool::format::{DoneReason, OutcomeKind};
use tsubame_spool::{Envelope, MessageId, Spool, SpooledMessage};

use crate::commit_watch::CommitWatch;
use crate::control::{
    Action, ControlRequest, ControlResponse, IDS_PER_REQUEST_MAX, LIST_PAGE_MAX, MessageSummary,
    RecipientSummary,
};
use crate::delivery_log::{DeliveryLog, EventKind, Record};
use crate::inbox::{Inbox, Pop};
use crate::job::{MessageMeta, RecipientReport, Report, WorkItem};
use crate::routing::{RouteInput, Router};
use crate::stats::{QueueDepth, RelayStats, RouteLabel};
use crate::upstream::Upstream;
use crate::{bounce, now_unix_ms};

/// Longest the dispatcher sleeps with nothing to do: the bound on how late a reclaim
/// pass or a shutdown deadline check can be.
const IDLE_WAKEUP: Duration = Duration::from_secs(1);

/// Inputs handled before the dispatcher hands out jobs again: keeps a burst of arrivals
/// from starving the workers.
const BATCH_MAX: usize = 4096;

/// Longest the dispatcher waits for a bounce's commit before it journals the failure
/// the bounce reports; a commit normally takes well under a millisecond, a sync on a
/// struggling disk seconds.
const BOUNCE_COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the dispatcher lets work gather after a busy round (see `run`).
const BUSY_GATHER_INTERVAL: Duration = Duration::from_micros(500);

/// How long reclaim passes continue after the last message finished: long enough for
/// its done record's commit.
const RECLAIM_TAIL: Duration = Duration::from_secs(3);

/// How often done records that could not be appended are tried again.
const DONE_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// How often reclaim runs while messages are finishing.
const RECLAIM_INTERVAL: Duration = Duration::from_millis(500);

/// Everything that reaches the dispatcher, in one queue.
// A command carries a whole `SpooledMessage` (about 260 bytes); boxing it would cost an
// allocation per message for a queue whose slots are reused anyway.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Input {
    Command(Command),
    Report(Report),
}

/// What the dispatcher is asked to do by other threads.
pub(crate) enum Command {
    /// A message is durable in the spool; schedule it. With the header fields to send
    /// before it when the spool could not store them (see `signing`).
    Accepted(SpooledMessage, Option<Arc<[u8]>>),
    /// A message recovery found, back from the signing pool; queue it with its journal.
    Recovered(SpooledMessage, Option<Arc<[u8]>>),
    Control(ControlRequest, Sender<ControlResponse>),
    /// Stop handing out jobs; wait for those in flight until `deadline`; then return.
    Shutdown {
        deadline: Instant,
    },
    /// A configuration reload: put `plan` in force; answer with the number of queued
    /// recipients moved off retired upstreams.
    Reload(Box<ReloadPlan>, Sender<usize>),
}

/// What a reload changes in the dispatcher (built by `Relay::reload`, which has already
/// checked the configuration and started the new upstreams' workers).
pub(crate) struct ReloadPlan {
    /// The whole table: the old upstreams at their indexes (retired ones too: their
    /// in-flight jobs still report), then the added ones.
    pub upstreams: Vec<Arc<Upstream>>,
    /// The added upstreams' indexes and job queues, in index order, each index one past
    /// the table's end at the time: new scheduler routes.
    pub added: Vec<(usize, Arc<Inbox<WorkItem>>)>,
    /// Upstreams removed or replaced: no new jobs; their queued recipients move.
    pub retired: Vec<usize>,
    /// Routes names to the indexes of the upstreams in force.
    pub router: Router,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Accepted(message, _) => write!(f, "Accepted({})", message.id),
            Self::Recovered(message, _) => write!(f, "Recovered({})", message.id),
            Self::Control(request, _) => write!(f, "Control({request:?})"),
            Self::Shutdown { .. } => f.write_str("Shutdown"),
            Self::Reload(plan, _) => write!(
                f,
                "Reload(added {}, retired {})",
                plan.added.len(),
                plan.retired.len()
            ),
        }
    }
}

/// Where one recipient stands, for `queue list` and bounces.
#[derive(Debug, Clone)]
struct RecipientStatus {
    upstream: usize,
    /// The routing decision that chose `upstream`, for the metrics' `route` label: the
    /// file in force when the recipient was routed, whatever a reload did since.
    route: RouteLabel,
    attempts: u32,
    state: RecipientPhase,
    last_detail: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecipientPhase {
    Queued,
    Sending,
    Deferred,
    Delivered,
    Failed,
}

impl RecipientPhase {
    fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Sending => "sending",
            Self::Deferred => "deferred",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }
}

#[derive(Debug)]
struct Entry {
    meta: Arc<MessageMeta>,
    /// Invariant: one per recipient of the message.
    recipients: Vec<RecipientStatus>,
    /// The Message-ID header field, once a worker has read the message: for the
    /// delivery log.
    message_id: Option<String>,
}

pub(crate) struct Dispatcher {
    pub scheduler: Scheduler,
    pub spool: Spool,
    pub upstreams: Vec<Arc<Upstream>>,
    /// Per upstream, the queue its workers take jobs from. Closed at shutdown so the
    /// workers end.
    pub job_queues: Vec<Arc<Inbox<WorkItem>>>,
    pub router: Router,
    /// Upstreams a reload removed or replaced (indexes into `upstreams`): their queues
    /// are closed and no recipient is routed to them; recipients still there when their
    /// job completes move to the router's choice.
    retired: std::collections::HashSet<usize>,
    pub inbox: Arc<Inbox<Input>>,
    /// Our name: Reporting-MTA of bounces and the HELO recorded for them.
    pub hostname: String,
    messages: HashMap<MessageKey, Entry>,
    /// Messages finished since the last reclaim pass.
    done_since_reclaim: usize,
    /// Reclaim passes go on until then: the done records of the last messages become
    /// durable (and so count for reclaim) only after their commit.
    reclaim_until: Option<Instant>,
    /// Messages whose done record could not be appended (disk full): retried every
    /// `DONE_RETRY_INTERVAL`, and once more at shutdown.
    pending_done: Vec<MessageId>,
    last_done_retry: Instant,
    last_reclaim: Instant,
    /// Set by `Command::Shutdown`.
    shutdown_deadline: Option<Instant>,
    /// Counts bounces made by this process, for their Message-IDs.
    bounces_made: u64,
    /// The scheduler's schedule, to work out when a recovered recipient is due.
    retry: RetrySchedule,
    /// `serve --hold`: hand out no jobs.
    hold: bool,
    /// The spool's commit notices, to wait for a bounce to be durable.
    commits: Arc<CommitWatch>,
    /// The signing pool's queue, when signing is on: bounces go through it.
    signing: Option<Arc<Inbox<crate::signing::Task>>>,
    /// Messages on hold (`queue hold`), saved in `held_path`.
    held: std::collections::HashSet<MessageKey>,
    held_path: std::path::PathBuf,
    /// The delivery log, when it is on.
    delivery_log: Option<DeliveryLog>,
    /// Counters for `/metrics`.
    stats: Arc<RelayStats>,
}

/// What an attempt's event says beyond the message and recipient.
struct AttemptFacts<'a> {
    message_id: Option<&'a str>,
    reply: &'a str,
    category: Option<tsubame_delivery::FailureCategory>,
    remote: Option<&'a str>,
    tls: Option<&'a str>,
    attempt: u32,
    attempt_ms: Option<u64>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("messages", &self.messages.len())
            .finish_non_exhaustive()
    }
}

/// What became of a recovered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    Queued,
    /// Every recipient was final: journalled done now.
    Finished,
    /// Done already, or the scheduler refused it.
    Skipped,
}

fn timestamp(unix_ms: u64) -> Timestamp {
    Timestamp::from_unix_ms(unix_ms)
}

impl Dispatcher {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        scheduler: Scheduler,
        spool: Spool,
        upstreams: Vec<Arc<Upstream>>,
        job_queues: Vec<Arc<Inbox<WorkItem>>>,
        router: Router,
        inbox: Arc<Inbox<Input>>,
        hostname: String,
        retry: RetrySchedule,
        hold: bool,
        commits: Arc<CommitWatch>,
        signing: Option<Arc<Inbox<crate::signing::Task>>>,
        held_path: std::path::PathBuf,
        delivery_log: Option<DeliveryLog>,
    ) -> Self {
        if hold {
            tracing::warn!(
                "delivery is on hold (--hold): mail is accepted and queued, nothing is sent"
            );
        }
        let stats = Arc::new(RelayStats::new(
            upstreams
                .iter()
                .map(|upstream| upstream.name().to_string())
                .collect(),
        ));
        Self {
            scheduler,
            spool,
            upstreams,
            job_queues,
            router,
            retired: std::collections::HashSet::new(),
            inbox,
            hostname,
            messages: HashMap::new(),
            done_since_reclaim: 0,
            reclaim_until: None,
            pending_done: Vec::new(),
            last_done_retry: Instant::now(),
            last_reclaim: Instant::now(),
            shutdown_deadline: None,
            bounces_made: 0,
            retry,
            hold,
            commits,
            signing,
            held: std::collections::HashSet::new(),
            held_path,
            delivery_log,
            stats,
        }
    }

    /// The counters this dispatcher keeps, for `/metrics`.
    pub fn stats(&self) -> Arc<RelayStats> {
        Arc::clone(&self.stats)
    }

    /// Publishes the queue's size (after each round of work).
    fn publish_queue_depth(&self) {
        let counts = self.scheduler.counts();
        self.stats.set_queue(QueueDepth {
            messages: self.messages.len() as u64,
            held_messages: self.held.len() as u64,
            ready: counts.ready as u64,
            in_flight: counts.in_flight as u64,
            deferred: counts.deferred as u64,
            held: counts.held as u64,
        });
    }

    /// Writes one event to the delivery log, when it is on.
    fn log_event(
        &mut self,
        event: EventKind,
        message: &SpooledMessage,
        recipient: RecipientIndex,
        upstream: usize,
        facts: Option<AttemptFacts<'_>>,
        now_ms: u64,
    ) {
        let address = message
            .recipients
            .get(recipient.0 as usize)
            .map_or("", String::as_str);
        let (_, rule) = self
            .router
            .route_and_rule(&RouteInput::of(message, address));
        let route = rule.map_or(RouteLabel::Default, RouteLabel::Rule);
        self.stats.count((event, route, upstream));
        if event == EventKind::Delivered {
            self.stats.delivered_after(Duration::from_millis(
                now_ms.saturating_sub(message.received_at_unix_ms),
            ));
        }
        let Some(log) = self.delivery_log.as_mut() else {
            return;
        };
        let record = Record {
            time: tsubame_delivery::dsn::rfc3339_ms(now_ms).into(),
            event,
            id: message.id.to_string().into(),
            message_id: facts
                .as_ref()
                .and_then(|facts| facts.message_id.map(Cow::Borrowed)),
            sender: Cow::Borrowed(&message.mail_from),
            recipient: Cow::Borrowed(address),
            upstream: Cow::Borrowed(
                self.upstreams
                    .get(upstream)
                    .map_or("?", |upstream| upstream.name()),
            ),
            remote: facts
                .as_ref()
                .and_then(|facts| facts.remote.map(Cow::Borrowed)),
            reply: facts.as_ref().map(|facts| Cow::Borrowed(facts.reply)),
            category: facts
                .as_ref()
                .and_then(|facts| facts.category)
                .map(|category| Cow::Borrowed(category.as_str())),
            attempt: facts.as_ref().map_or(0, |facts| facts.attempt),
            size_bytes: message.body_size_bytes,
            tls: facts
                .as_ref()
                .and_then(|facts| facts.tls.map(Cow::Borrowed)),
            since_received_ms: now_ms.saturating_sub(message.received_at_unix_ms),
            attempt_ms: facts.as_ref().and_then(|facts| facts.attempt_ms),
        };
        log.write(&record, now_ms);
    }

    /// Puts the messages recovery found back in the queue, with their journal's
    /// attempts and the retry time those imply.
    pub fn recover(&mut self, messages: Vec<SpooledMessage>) {
        let now_ms = now_unix_ms();
        let mut queued = 0usize;
        let mut finished = 0usize;
        for message in messages {
            match self.recover_one(message, None, now_ms) {
                Recovery::Queued => queued += 1,
                Recovery::Finished => finished += 1,
                Recovery::Skipped => {}
            }
        }
        if queued > 0 || finished > 0 {
            tracing::info!(queued, finished, "delivery queue rebuilt from the spool");
        }
    }

    /// Queues one message recovery found (see [`Dispatcher::recover`]).
    fn recover_one(
        &mut self,
        message: SpooledMessage,
        in_memory: Option<Arc<[u8]>>,
        now_ms: u64,
    ) -> Recovery {
        if message.state == tsubame_spool::MessageState::Done {
            return Recovery::Skipped;
        }
        let key = MessageKey(message.id.0);
        let meta = Arc::new(MessageMeta::new(message, in_memory));
        let message = &meta.message;
        let mut statuses = Vec::with_capacity(message.recipients.len());
        let mut pending = Vec::new();
        for (index, (recipient, state)) in message
            .recipients
            .iter()
            .zip(&message.recipient_states)
            .enumerate()
        {
            let (upstream, route) = self.route(message, recipient);
            let phase = match state.final_outcome {
                Some(OutcomeKind::Delivered) => RecipientPhase::Delivered,
                Some(_) => RecipientPhase::Failed,
                None if state.attempts > 0 => RecipientPhase::Deferred,
                None => RecipientPhase::Queued,
            };
            statuses.push(RecipientStatus {
                upstream,
                route,
                attempts: state.attempts,
                state: phase,
                last_detail: None,
            });
            if state.final_outcome.is_none() {
                let next_attempt_at = state.last_attempt_unix_ms.map(|last| {
                    timestamp(last.saturating_add(self.scheduler_retry_delay_ms(state.attempts)))
                });
                pending.push(RecoveredRecipient {
                    recipient: RecipientIndex(index as u32),
                    route: RouteId(upstream as u32),
                    attempts: state.attempts,
                    next_attempt_at,
                });
            }
        }
        if pending.is_empty() {
            // Every recipient is final but the done record did not make it to disk.
            self.message_done(message.id);
            return Recovery::Finished;
        }
        match self.scheduler.insert_recovered(
            key,
            timestamp(message.received_at_unix_ms),
            &pending,
            timestamp(now_ms),
        ) {
            Ok(()) => {
                self.messages.insert(
                    key,
                    Entry {
                        meta: Arc::clone(&meta),
                        recipients: statuses,
                        message_id: None,
                    },
                );
                if self.held.contains(&key) {
                    let _ = self.scheduler.hold(key);
                }
                Recovery::Queued
            }
            Err(error) => {
                tracing::error!(id = %message.id, %error, "cannot queue a recovered message");
                Recovery::Skipped
            }
        }
    }

    fn scheduler_retry_delay_ms(&self, attempts: u32) -> u64 {
        self.retry.delay_ms(attempts)
    }

    /// The upstream for one recipient, and which decision chose it.
    fn route(&self, message: &SpooledMessage, recipient: &str) -> (usize, RouteLabel) {
        let (upstream, rule) = self
            .router
            .route_and_rule(&RouteInput::of(message, recipient));
        (upstream, rule.map_or(RouteLabel::Default, RouteLabel::Rule))
    }

    /// Runs until shut down.
    pub fn run(mut self) {
        // Segments whose messages all finished before the last stop go at once.
        self.reclaim();
        let mut batch = Vec::new();
        loop {
            let timeout = self.sleep_for();
            match self.inbox.pop_timeout(timeout) {
                Pop::Item(input) => batch.push(input),
                Pop::Timeout => {}
                Pop::Closed => self.begin_shutdown(Instant::now()),
            }
            self.inbox.drain_into(&mut batch, BATCH_MAX);
            let busy = !batch.is_empty();
            for input in batch.drain(..) {
                match input {
                    Input::Command(command) => self.command(command),
                    Input::Report(report) => self.report(report),
                }
            }
            let now = timestamp(now_unix_ms());
            let events = self.scheduler.advance(now);
            self.events(events, now);
            if self.shutdown_deadline.is_none() && !self.hold {
                self.dispatch(now);
            }
            self.maybe_reclaim();
            self.publish_queue_depth();
            if let Some(log) = self.delivery_log.as_mut() {
                log.tick();
            }
            if busy && self.shutdown_deadline.is_none() {
                // Under load, let inputs gather instead of being woken for each one: a
                // sleeping dispatcher is not a waiter, so pushes skip the wake-up. Costs
                // at most this much latency per hop; measured end to end, it saves about
                // two context switches per message.
                std::thread::sleep(BUSY_GATHER_INTERVAL);
            }
            if let Some(deadline) = self.shutdown_deadline {
                let in_flight = self.in_flight();
                if in_flight == 0 {
                    break;
                }
                if Instant::now() >= deadline {
                    tracing::warn!(
                        in_flight,
                        "shutdown timeout: deliveries still in progress are left; they are tried again at the next start"
                    );
                    break;
                }
            }
        }
        if !self.pending_done.is_empty() {
            self.retry_pending_done();
        }
        // Closing the job queues ends the workers once their current job is done.
        for queue in &self.job_queues {
            queue.close();
        }
        self.inbox.close();
        self.reclaim();
        if let Some(log) = self.delivery_log.as_mut() {
            log.flush();
        }
    }

    fn in_flight(&self) -> usize {
        (0..self.upstreams.len())
            .map(|route| self.scheduler.in_flight(RouteId(route as u32)))
            .sum()
    }

    fn sleep_for(&self) -> Duration {
        let now_ms = now_unix_ms();
        let mut sleep = IDLE_WAKEUP;
        // Shutting down or on hold, no job is handed out, so a rate limit's next token
        // is no reason to wake (its bucket is only refreshed by handing out jobs: the
        // wake-up would stay in the past and the loop would spin). Expiry is checked
        // once per IDLE_WAKEUP then; reports wake the loop through the inbox.
        let dispatching = self.shutdown_deadline.is_none() && !self.hold;
        if dispatching && let Some(wakeup) = self.scheduler.next_wakeup() {
            let wakeup_ms = wakeup.unix_ms;
            sleep = sleep.min(Duration::from_millis(wakeup_ms.saturating_sub(now_ms)));
        }
        if self.reclaim_wanted() {
            sleep = sleep.min(RECLAIM_INTERVAL.saturating_sub(self.last_reclaim.elapsed()));
        }
        if let Some(flush_in) = self
            .delivery_log
            .as_ref()
            .and_then(DeliveryLog::next_flush_in)
        {
            sleep = sleep.min(flush_in);
        }
        if !self.pending_done.is_empty() {
            sleep = sleep.min(DONE_RETRY_INTERVAL.saturating_sub(self.last_done_retry.elapsed()));
        }
        sleep
    }

    fn begin_shutdown(&mut self, deadline: Instant) {
        if self.shutdown_deadline.is_none() {
            // Jobs waiting at a worker have not started: take them back, so that only
            // transactions already in progress run to their end. They were not attempted,
            // so nothing is journalled; the next start queues them from the spool.
            let now = timestamp(now_unix_ms());
            let mut unstarted = Vec::new();
            for queue in &self.job_queues {
                queue.drain_into(&mut unstarted, usize::MAX);
            }
            for item in unstarted {
                for (recipient, _) in &item.recipients {
                    let _ = self
                        .scheduler
                        .complete(item.job, *recipient, Outcome::Deferred, now);
                }
            }
            tracing::info!(
                in_flight = self.in_flight(),
                queued = self.messages.len(),
                "delivery stopping: no new attempts; waiting for those in progress"
            );
            self.shutdown_deadline = Some(deadline);
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Accepted(message, in_memory) => self.accept(message, in_memory),
            Command::Recovered(message, in_memory) => {
                let queued = self.recover_one(message, in_memory, now_unix_ms());
                if queued == Recovery::Finished {
                    tracing::debug!("a recovered message had every recipient final");
                }
            }
            Command::Control(request, reply) => {
                let response = self.control(request);
                let _ = reply.send(response);
            }
            Command::Shutdown { deadline } => self.begin_shutdown(deadline),
            Command::Reload(plan, reply) => {
                let rerouted = self.reload(*plan);
                let _ = reply.send(rerouted);
            }
        }
    }

    /// Puts a reloaded configuration's upstreams and routes in force (see
    /// [`ReloadPlan`]) and moves the queued recipients of retired upstreams; returns how
    /// many moved now (those in flight move when their job completes).
    fn reload(&mut self, plan: ReloadPlan) -> usize {
        let ReloadPlan {
            upstreams,
            added,
            retired,
            router,
        } = plan;
        for (index, queue) in added {
            let limits = upstreams
                .get(index)
                .map(|upstream| upstream.route_limits())
                .unwrap_or_default();
            match self.scheduler.add_route(limits) {
                // The table and the scheduler's routes grow together, only here.
                Ok(RouteId(route)) if route as usize == index => {}
                Ok(route) => {
                    tracing::error!(
                        index,
                        ?route,
                        "scheduler route out of step with the upstream table"
                    );
                    debug_assert!(false, "scheduler route out of step with the table");
                }
                Err(error) => {
                    tracing::error!(index, %error, "scheduler refused a reloaded upstream")
                }
            }
            self.job_queues.push(queue);
        }
        self.stats.set_upstream_names(
            upstreams
                .iter()
                .map(|upstream| upstream.name().to_string())
                .collect(),
        );
        self.upstreams = upstreams;
        self.router = router;
        for index in retired {
            if let Some(queue) = self.job_queues.get(index) {
                // Jobs already queued there still run; the workers end after them.
                queue.close();
            }
            self.retired.insert(index);
        }
        let keys: Vec<MessageKey> = self.messages.keys().copied().collect();
        let mut moved = 0;
        for key in keys {
            moved += self.reroute_retired(key, None);
        }
        moved
    }

    /// Moves the pending recipients of message `key` that are on a retired upstream (only
    /// those in `only`, when given) to the upstream the router names now, keeping their
    /// attempts and retry time. In-flight ones stay until their job completes. Returns
    /// how many moved.
    fn reroute_retired(&mut self, key: MessageKey, only: Option<&[RecipientIndex]>) -> usize {
        if self.retired.is_empty() {
            return 0;
        }
        let Some(entry) = self.messages.get(&key) else {
            return 0;
        };
        let meta = Arc::clone(&entry.meta);
        let candidates: Vec<usize> = entry
            .recipients
            .iter()
            .enumerate()
            .filter(|(index, status)| {
                self.retired.contains(&status.upstream)
                    && !matches!(
                        status.state,
                        RecipientPhase::Delivered | RecipientPhase::Failed
                    )
                    && only.is_none_or(|only| only.contains(&RecipientIndex(*index as u32)))
            })
            .map(|(index, _)| index)
            .collect();
        let mut moved = 0;
        for index in candidates {
            let Some(address) = meta.message.recipients.get(index) else {
                continue;
            };
            let (upstream, route) = self.route(&meta.message, address);
            let recipient = RecipientIndex(index as u32);
            match self
                .scheduler
                .reroute(key, recipient, RouteId(upstream as u32))
            {
                Ok(true) => {
                    moved += 1;
                    if let Some(status) = self
                        .messages
                        .get_mut(&key)
                        .and_then(|entry| entry.recipients.get_mut(index))
                    {
                        status.upstream = upstream;
                        status.route = route;
                    }
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::error!(id = %meta.message.id, %error, "cannot move a recipient off a retired upstream")
                }
            }
        }
        moved
    }

    fn accept(&mut self, message: SpooledMessage, in_memory: Option<Arc<[u8]>>) {
        let key = MessageKey(message.id.0);
        let meta = Arc::new(MessageMeta::new(message, in_memory));
        let message = &meta.message;
        let mut recipients = Vec::with_capacity(message.recipients.len());
        let mut statuses = Vec::with_capacity(message.recipients.len());
        for (index, recipient) in message.recipients.iter().enumerate() {
            let (upstream, route) = self.route(message, recipient);
            recipients.push((RecipientIndex(index as u32), RouteId(upstream as u32)));
            statuses.push(RecipientStatus {
                upstream,
                route,
                attempts: 0,
                state: RecipientPhase::Queued,
                last_detail: None,
            });
        }
        let now = timestamp(now_unix_ms());
        match self.scheduler.insert(
            key,
            timestamp(message.received_at_unix_ms),
            &recipients,
            now,
        ) {
            Ok(()) => {
                self.messages.insert(
                    key,
                    Entry {
                        meta: Arc::clone(&meta),
                        recipients: statuses,
                        message_id: None,
                    },
                );
                for (recipient, route) in recipients {
                    self.log_event(
                        EventKind::Received,
                        &meta.message,
                        recipient,
                        route.0 as usize,
                        None,
                        now.unix_ms,
                    );
                }
            }
            Err(error) => {
                // Stays in the spool; the next start queues it from there.
                tracing::error!(id = %message.id, %error, "cannot queue an accepted message");
            }
        }
    }

    /// Hands out every job the scheduler allows now.
    fn dispatch(&mut self, now: Timestamp) {
        for (route, upstream) in self.upstreams.iter().enumerate() {
            if self.retired.contains(&route) {
                continue;
            }
            let max_recipients = upstream.config.max_recipients_per_transaction;
            loop {
                let job = match self
                    .scheduler
                    .next_job(RouteId(route as u32), now, max_recipients)
                {
                    Ok(Some(job)) => job,
                    Ok(None) => break,
                    Err(error) => {
                        tracing::error!(%error, "scheduler refused a route");
                        break;
                    }
                };
                let Job {
                    id,
                    message,
                    recipients,
                    ..
                } = job;
                let Some(entry) = self.messages.get_mut(&message) else {
                    // Cannot happen: the scheduler only knows messages we inserted.
                    tracing::error!(?message, "job for a message the dispatcher does not know");
                    continue;
                };
                for job_recipient in &recipients {
                    if let Some(status) =
                        entry.recipients.get_mut(job_recipient.recipient.0 as usize)
                    {
                        status.state = RecipientPhase::Sending;
                        status.attempts = job_recipient.attempt;
                    }
                }
                let item = WorkItem {
                    job: id,
                    meta: Arc::clone(&entry.meta),
                    recipients: recipients
                        .iter()
                        .map(|recipient| (recipient.recipient, recipient.attempt))
                        .collect(),
                };
                if let Some(queue) = self.job_queues.get(route)
                    && queue.push(item).is_err()
                {
                    tracing::error!(upstream = upstream.name(), "delivery workers are gone");
                }
            }
        }
    }

    fn report(&mut self, report: Report) {
        let now_ms = now_unix_ms();
        let now = timestamp(now_ms);
        let id = report.message.message.id;
        // Shared, not copied: the name is only read for the log lines below.
        let upstream = self.upstreams.get(report.upstream).map(Arc::clone);
        let upstream_name = upstream.as_deref().map_or("?", Upstream::name);
        if !self.messages.contains_key(&MessageKey(id.0)) {
            // Deleted by an operator while this job was in flight: its outcome changes
            // nothing (no journal record, no bounce); the scheduler frees the slot.
            for recipient in &report.recipients {
                let _ = self.scheduler.complete(
                    report.job,
                    recipient.recipient,
                    recipient.outcome,
                    now,
                );
            }
            return;
        }
        // A permanent failure is final only once its bounce is in the spool: spool the
        // bounce first, so a crash cannot leave a journalled failure without one.
        let failed: Vec<&RecipientReport> = report
            .recipients
            .iter()
            .filter(|recipient| recipient.outcome == Outcome::Failed)
            .collect();
        let bounce_spooled = failed.is_empty() || self.bounce(&report.message, &failed, now_ms);
        let message_id = match self.messages.get_mut(&MessageKey(id.0)) {
            Some(entry) => {
                if report.message_id.is_some() {
                    entry.message_id.clone_from(&report.message_id);
                }
                entry.message_id.clone()
            }
            None => report.message_id.clone(),
        };
        let mut events = Vec::new();
        let mut outcomes = Vec::with_capacity(report.recipients.len());
        for recipient in &report.recipients {
            let mut outcome = recipient.outcome;
            if outcome == Outcome::Failed && !bounce_spooled {
                outcome = Outcome::Deferred;
            }
            let address = report
                .message
                .message
                .recipients
                .get(recipient.recipient.0 as usize)
                .map_or("", String::as_str);
            let attempt = self
                .messages
                .get(&MessageKey(id.0))
                .and_then(|entry| entry.recipients.get(recipient.recipient.0 as usize))
                .map_or(0, |status| status.attempts);
            let event = match outcome {
                Outcome::Delivered => EventKind::Delivered,
                Outcome::Deferred => EventKind::Deferred,
                Outcome::Failed => EventKind::Bounced,
            };
            let category = (outcome != Outcome::Delivered)
                .then(|| tsubame_delivery::failure_category(&recipient.detail));
            self.log_event(
                event,
                &report.message.message,
                recipient.recipient,
                report.upstream,
                Some(AttemptFacts {
                    message_id: message_id.as_deref(),
                    reply: &recipient.detail,
                    category,
                    remote: recipient.remote.as_deref(),
                    tls: recipient.tls.as_deref(),
                    attempt,
                    attempt_ms: Some(report.attempt_ms),
                }),
                now_ms,
            );
            let kind = match outcome {
                Outcome::Delivered => {
                    tracing::info!(%id, to = address, upstream = upstream_name, remote = recipient.remote.as_deref().unwrap_or(""), reply = recipient.detail, "delivered");
                    OutcomeKind::Delivered
                }
                Outcome::Deferred => {
                    tracing::info!(%id, to = address, upstream = upstream_name, reason = recipient.detail, "deferred");
                    OutcomeKind::Deferred
                }
                Outcome::Failed => {
                    tracing::info!(%id, to = address, upstream = upstream_name, reply = recipient.detail, "bounced");
                    OutcomeKind::Failed
                }
            };
            outcomes.push((recipient, kind));
            if let Some(entry) = self.messages.get_mut(&MessageKey(id.0))
                && let Some(status) = entry.recipients.get_mut(recipient.recipient.0 as usize)
            {
                status.state = match outcome {
                    Outcome::Delivered => RecipientPhase::Delivered,
                    Outcome::Deferred => RecipientPhase::Deferred,
                    Outcome::Failed => RecipientPhase::Failed,
                };
                status.last_detail = Some(recipient.detail.clone());
            }
            match self
                .scheduler
                .complete(report.job, recipient.recipient, outcome, now)
            {
                Ok(more) => events.extend(more),
                Err(error) => tracing::error!(%id, %error, "scheduler refused an outcome"),
            }
        }
        // A delivery that finishes its message needs no record of its own: the
        // message-done record that follows says every recipient is final, and nothing
        // reads a delivered recipient's record once its message is done
        // (spool-format/README.md, "Recipient outcome"). Saves a record per message.
        let message_done = events
            .iter()
            .any(|event| matches!(event, Event::MessageDone { message } if message.0 == id.0));
        for (recipient, kind) in outcomes {
            if message_done && kind == OutcomeKind::Delivered {
                continue;
            }
            self.journal(id, recipient.recipient, kind, now_ms, &recipient.detail);
        }
        self.events(events, now);
        if self.retired.contains(&report.upstream) {
            let completed: Vec<RecipientIndex> = report
                .recipients
                .iter()
                .map(|recipient| recipient.recipient)
                .collect();
            let moved = self.reroute_retired(MessageKey(id.0), Some(&completed));
            if moved > 0 {
                tracing::info!(%id, recipients = moved, "deferred recipients moved off a retired upstream");
            }
        }
    }

    fn journal(
        &self,
        id: MessageId,
        recipient: RecipientIndex,
        kind: OutcomeKind,
        at_unix_ms: u64,
        detail: &str,
    ) {
        if let Err(error) =
            self.spool
                .append_recipient_outcome(id, recipient.0, kind, at_unix_ms, detail)
        {
            // Without the record a restart repeats the attempt: a duplicate at worst.
            tracing::error!(%id, %error, "cannot journal a delivery outcome");
        }
    }

    fn events(&mut self, events: Vec<Event>, now: Timestamp) {
        let mut expired: HashMap<MessageKey, Vec<RecipientIndex>> = HashMap::new();
        let mut done = Vec::new();
        for event in events {
            match event {
                Event::Expired { message, recipient } => {
                    expired.entry(message).or_default().push(recipient)
                }
                Event::MessageDone { message } => done.push(message),
            }
        }
        let now_ms = now.unix_ms;
        let mut bounce_failed = Vec::new();
        for (key, recipients) in expired {
            let Some(entry) = self.messages.get_mut(&key) else {
                continue;
            };
            let meta = Arc::clone(&entry.meta);
            let message_id = entry.message_id.clone();
            let mut reports = Vec::new();
            // Per recipient: its upstream, attempts and what its last reply says.
            let mut expiry_facts = Vec::new();
            for recipient in recipients {
                let status = entry.recipients.get(recipient.0 as usize);
                let last_detail = status.and_then(|status| status.last_detail.clone());
                expiry_facts.push((
                    status.map_or(0, |status| status.upstream),
                    status.map_or(0, |status| status.attempts),
                    last_detail.as_deref().map_or(
                        tsubame_delivery::FailureCategory::Timeout,
                        tsubame_delivery::failure_category,
                    ),
                ));
                let last = last_detail.unwrap_or_else(|| "no attempt succeeded".to_string());
                let detail = format!("message expired after the maximum queue time; last: {last}");
                if let Some(status) = entry.recipients.get_mut(recipient.0 as usize) {
                    status.state = RecipientPhase::Failed;
                    status.last_detail = Some(detail.clone());
                }
                reports.push(RecipientReport {
                    recipient,
                    outcome: Outcome::Failed,
                    detail,
                    // RFC 3463: 4.4.7 delivery time expired, final here.
                    status: "4.4.7".to_string(),
                    remote: None,
                    tls: None,
                    spill: false,
                });
            }
            let failed: Vec<&RecipientReport> = reports.iter().collect();
            if !self.bounce(&meta, &failed, now_ms) {
                // Journal nothing: at the next start these recipients expire again and
                // their bounce is tried again.
                tracing::error!(id = %meta.message.id, "cannot spool the bounce for an expired message; it is tried again at the next start");
                bounce_failed.push(key);
                continue;
            }
            for (report, &(upstream, attempt, category)) in reports.iter().zip(&expiry_facts) {
                tracing::info!(id = %meta.message.id, to = meta.message.recipients.get(report.recipient.0 as usize).map_or("", String::as_str), reason = report.detail, "expired");
                self.log_event(
                    EventKind::Expired,
                    &meta.message,
                    report.recipient,
                    upstream,
                    Some(AttemptFacts {
                        message_id: message_id.as_deref(),
                        reply: &report.detail,
                        category: Some(category),
                        remote: None,
                        tls: None,
                        attempt,
                        attempt_ms: None,
                    }),
                    now_ms,
                );
                self.journal(
                    meta.message.id,
                    report.recipient,
                    OutcomeKind::Expired,
                    now_ms,
                    &report.detail,
                );
            }
        }
        for key in done {
            if let Some(entry) = self.messages.remove(&key)
                && !bounce_failed.contains(&key)
            {
                self.message_done(entry.meta.message.id);
            }
        }
    }

    fn message_done(&mut self, id: MessageId) {
        if self.held.remove(&MessageKey(id.0)) {
            self.save_held();
        }
        if !self.append_done(id) {
            self.pending_done.push(id);
        }
    }

    fn append_done(&mut self, id: MessageId) -> bool {
        match self
            .spool
            .append_message_done(id, now_unix_ms(), DoneReason::AllRecipientsFinal)
        {
            Ok(_) => {
                self.done_since_reclaim += 1;
                self.reclaim_until = Some(Instant::now() + RECLAIM_TAIL);
                true
            }
            Err(error) => {
                // Until it is written the message's segment cannot be reclaimed, and a
                // restart would deliver the message again.
                tracing::error!(%id, %error, "cannot journal that a message is done; retrying");
                false
            }
        }
    }

    fn retry_pending_done(&mut self) {
        self.last_done_retry = Instant::now();
        let pending = std::mem::take(&mut self.pending_done);
        for (position, id) in pending.iter().enumerate() {
            if !self.append_done(*id) {
                // Still failing: keep this one and the rest for the next round.
                self.pending_done
                    .extend_from_slice(pending.get(position..).unwrap_or_default());
                break;
            }
        }
    }

    /// Spools one bounce for `failed` recipients of `meta`'s message; true when it is
    /// in the spool (or none is due: the null sender never gets one).
    fn bounce(
        &mut self,
        meta: &Arc<MessageMeta>,
        failed: &[&RecipientReport],
        now_ms: u64,
    ) -> bool {
        let original = &meta.message;
        if !bounce::is_bounceable(&original.mail_from) {
            return true;
        }
        self.bounces_made += 1;
        let bounce = match bounce::build(
            &self.spool,
            &self.hostname,
            meta,
            failed,
            now_ms,
            self.bounces_made,
        ) {
            Ok(bounce) => bounce,
            Err(error) => {
                tracing::error!(id = %original.id, %error, "cannot read the original for its bounce");
                return false;
            }
        };
        let recipients = vec![original.mail_from.clone()];
        let client_address: std::net::SocketAddr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let envelope = Envelope {
            received_at_unix_ms: now_ms,
            client_address,
            helo: &self.hostname,
            authenticated_user: None,
            mail_from: "",
            mail_parameters: bounce.mail_parameters,
            recipients: &recipients,
        };
        match self.spool.append_message(&envelope, &bounce.content) {
            Ok(receipt) => {
                tracing::info!(id = %original.id, bounce = %receipt.id, to = original.mail_from, "bounce queued");
                // Scheduled at once: delivering it before its sync is harmless (nobody
                // was promised anything).
                let message = SpooledMessage {
                    id: receipt.id,
                    location: receipt.location,
                    received_at_unix_ms: now_ms,
                    client_address: client_address.to_string(),
                    helo: self.hostname.clone(),
                    authenticated_user: None,
                    mail_from: String::new(),
                    mail_parameters: bounce.mail_parameters.to_string(),
                    recipients,
                    body_size_bytes: bounce.content.len() as u64,
                    state: tsubame_spool::MessageState::Queued,
                    recipient_states: vec![tsubame_spool::RecipientState::default()],
                    added_fields: None,
                };
                // Bounces are signed like any message when signing is on.
                match &self.signing {
                    Some(queue) => {
                        if let Err(task) = queue.push(crate::signing::Task {
                            message,
                            recovered: false,
                        }) {
                            self.accept(task.message, None);
                        }
                    }
                    None => self.accept(message, None),
                }
                // The failure records the caller writes next must never be durable
                // without the bounce: the disk may write pages in any order
                // (spool-format/README.md), so wait for the bounce's own commit. Only
                // failures wait, and one group commit is a fraction of a millisecond.
                let durable = self
                    .commits
                    .wait_durable(receipt.sequence, BOUNCE_COMMIT_TIMEOUT);
                if !durable {
                    tracing::error!(id = %original.id, bounce = %receipt.id, "the bounce did not become durable; the failure is retried instead");
                }
                durable
            }
            Err(error) => {
                tracing::error!(id = %original.id, %error, "cannot spool a bounce; the failure is retried instead");
                false
            }
        }
    }

    fn maybe_reclaim(&mut self) {
        if !self.pending_done.is_empty() && self.last_done_retry.elapsed() >= DONE_RETRY_INTERVAL {
            self.retry_pending_done();
        }
        if self.reclaim_wanted() && self.last_reclaim.elapsed() >= RECLAIM_INTERVAL {
            self.reclaim();
        }
    }

    fn reclaim_wanted(&self) -> bool {
        self.done_since_reclaim > 0
            || self
                .reclaim_until
                .is_some_and(|until| Instant::now() < until)
    }

    fn reclaim(&mut self) {
        self.done_since_reclaim = 0;
        self.last_reclaim = Instant::now();
        crate::reclaim::run(&self.spool);
    }

    fn control(&mut self, request: ControlRequest) -> ControlResponse {
        match request {
            ControlRequest::List { filter, page } => {
                let now_ms = now_unix_ms();
                // Ids are zero-padded hex, so the keys' order is the ids' order.
                let mut keys: Vec<MessageKey> = self.messages.keys().copied().collect();
                keys.sort_unstable();
                match page {
                    // No filter: the total is the queue's size, and only the page's
                    // messages are described.
                    Some(page) if filter.is_empty() => ControlResponse::Messages {
                        messages: keys
                            .iter()
                            .skip(page.offset)
                            .take(page.limit.min(LIST_PAGE_MAX))
                            .filter_map(|key| self.messages.get(key))
                            .map(|entry| self.summary(entry))
                            .collect(),
                        total: Some(keys.len()),
                    },
                    None => ControlResponse::Messages {
                        messages: keys
                            .iter()
                            .filter_map(|key| self.messages.get(key))
                            .map(|entry| self.summary(entry))
                            .filter(|summary| filter.matches(summary, now_ms))
                            .collect(),
                        total: None,
                    },
                    Some(page) => {
                        let limit = page.limit.min(LIST_PAGE_MAX);
                        let mut total = 0usize;
                        let mut messages = Vec::with_capacity(limit);
                        for entry in keys.iter().filter_map(|key| self.messages.get(key)) {
                            let summary = self.summary(entry);
                            if !filter.matches(&summary, now_ms) {
                                continue;
                            }
                            if total >= page.offset && messages.len() < limit {
                                messages.push(summary);
                            }
                            total += 1;
                        }
                        ControlResponse::Messages {
                            messages,
                            total: Some(total),
                        }
                    }
                }
            }
            ControlRequest::Show { id } => match self.find(&id) {
                Ok(key) => match self.messages.get(&key) {
                    Some(entry) => ControlResponse::Messages {
                        messages: vec![self.summary(entry)],
                        total: None,
                    },
                    None => ControlResponse::error(format!("message {id} is not queued")),
                },
                Err(response) => response,
            },
            ControlRequest::Flush => {
                let moved = self.scheduler.flush();
                tracing::info!(recipients = moved, "queue flushed by an operator");
                ControlResponse::Flushed { recipients: moved }
            }
            ControlRequest::Delete { id } => match self.find(&id) {
                Ok(key) => match self.delete(key) {
                    Ok(recipients) => ControlResponse::Deleted {
                        id: MessageId(key.0).to_string(),
                        recipients,
                    },
                    Err(message) => ControlResponse::error(message),
                },
                Err(response) => response,
            },
            ControlRequest::Apply { action, ids } => self.apply(action, &ids),
        }
    }

    /// `apply`: one action on each listed message.
    fn apply(&mut self, action: Action, ids: &[String]) -> ControlResponse {
        if ids.len() > IDS_PER_REQUEST_MAX {
            return ControlResponse::error(format!(
                "at most {IDS_PER_REQUEST_MAX} ids per request; send them in batches"
            ));
        }
        let now = timestamp(now_unix_ms());
        let (mut messages, mut recipients) = (0usize, 0usize);
        let mut missing = Vec::new();
        let mut held_changed = false;
        for id in ids {
            let Ok(key) = self.find(id) else {
                missing.push(id.clone());
                continue;
            };
            let result = match action {
                Action::Flush => self
                    .scheduler
                    .flush_message(key)
                    .map_err(|error| error.to_string()),
                Action::Delete => self.delete(key),
                Action::Hold => match self.scheduler.hold(key) {
                    Ok(()) => {
                        held_changed |= self.held.insert(key);
                        Ok(self.pending_of(key))
                    }
                    Err(error) => Err(error.to_string()),
                },
                Action::Release => match self.scheduler.release(key, now) {
                    Ok(()) => {
                        held_changed |= self.held.remove(&key);
                        Ok(self.pending_of(key))
                    }
                    Err(error) => Err(error.to_string()),
                },
            };
            match result {
                Ok(count) => {
                    messages += 1;
                    recipients += count;
                }
                Err(error) => {
                    tracing::warn!(id = %id, %error, "queue {action:?} failed");
                    missing.push(id.clone());
                }
            }
        }
        if held_changed {
            self.save_held();
        }
        tracing::info!(
            ?action,
            messages,
            recipients,
            "queue command by an operator"
        );
        ControlResponse::Applied {
            action,
            messages,
            recipients,
            missing,
        }
    }

    /// Recipients of a queued message not yet final.
    fn pending_of(&self, key: MessageKey) -> usize {
        self.messages.get(&key).map_or(0, |entry| {
            entry
                .recipients
                .iter()
                .filter(|status| {
                    !matches!(
                        status.state,
                        RecipientPhase::Delivered | RecipientPhase::Failed
                    )
                })
                .count()
        })
    }

    /// Removes a message for good (`queue delete`): journalled, so it stays deleted
    /// after a restart. Returns how many recipients were still pending.
    fn delete(&mut self, key: MessageKey) -> Result<usize, String> {
        let id = MessageId(key.0);
        let recipients = self
            .scheduler
            .remove_message(key)
            .map_err(|error| format!("message {id}: {error}"))?;
        self.messages.remove(&key);
        if self.held.remove(&key) {
            self.save_held();
        }
        // Its jobs not yet started must not start: take them back. (A transaction
        // already in progress finishes; its outcome is ignored.)
        let now = timestamp(now_unix_ms());
        for queue in &self.job_queues {
            for item in queue.take_where(|item| item.meta.message.id.0 == key.0) {
                for (recipient, _) in &item.recipients {
                    let _ = self
                        .scheduler
                        .complete(item.job, *recipient, Outcome::Deferred, now);
                }
            }
        }
        match self
            .spool
            .append_message_done(id, now_unix_ms(), DoneReason::Deleted)
        {
            Ok(_) => {
                self.done_since_reclaim += 1;
                tracing::info!(%id, recipients, "message deleted by an operator");
                Ok(recipients)
            }
            Err(error) => Err(format!(
                "message {id} removed from the queue, but the spool could not record it ({error}); it comes back at the next start"
            )),
        }
    }

    /// Writes the held set to `held.json` in the spool directory (replaced atomically),
    /// so that holds outlast a restart. A failure is logged: the holds stay in force
    /// for this run.
    fn save_held(&self) {
        let mut ids: Vec<String> = self
            .held
            .iter()
            .map(|key| MessageId(key.0).to_string())
            .collect();
        ids.sort();
        if let Err(error) = crate::held::save(&self.held_path, &ids) {
            tracing::warn!(file = %self.held_path.display(), %error, "cannot save the held messages; holds last until the next start only");
        }
    }

    /// Puts the messages `held.json` names back on hold: those recovery queued now, those
    /// still being signed when they arrive (`recover_one`).
    pub fn restore_held(&mut self) {
        let ids = match crate::held::load(&self.held_path) {
            Ok(ids) => ids,
            Err(error) => {
                tracing::warn!(file = %self.held_path.display(), %error, "cannot read the held messages; none is on hold");
                return;
            }
        };
        let mut restored = 0usize;
        for id in ids {
            let Ok(parsed) = id.parse::<MessageId>() else {
                continue;
            };
            let key = MessageKey(parsed.0);
            self.held.insert(key);
            if self.scheduler.hold(key).is_ok() {
                restored += 1;
            }
        }
        if restored > 0 {
            tracing::info!(messages = restored, "messages on hold stay on hold");
        }
    }

    fn find(&self, id: &str) -> Result<MessageKey, ControlResponse> {
        let parsed: MessageId = id.parse().map_err(|_| {
            ControlResponse::error(format!("{id:?} is not a message id (16 hex digits)"))
        })?;
        let key = MessageKey(parsed.0);
        if self.messages.contains_key(&key) {
            Ok(key)
        } else {
            Err(ControlResponse::error(format!(
                "message {id} is not queued"
            )))
        }
    }

    fn summary(&self, entry: &Entry) -> MessageSummary {
        let message = &entry.meta.message;
        MessageSummary {
            id: message.id.to_string(),
            mail_from: message.mail_from.clone(),
            received_at_unix_ms: message.received_at_unix_ms,
            size_bytes: message.body_size_bytes,
            held: self.held.contains(&MessageKey(message.id.0)),
            recipients: message
                .recipients
                .iter()
                .zip(&entry.recipients)
                .map(|(address, status)| RecipientSummary {
                    address: address.clone(),
                    upstream: self
                        .upstreams
                        .get(status.upstream)
                        .map_or("?", |upstream| upstream.name())
                        .to_string(),
                    state: status.state.as_str().to_string(),
                    attempts: status.attempts,
                    last_reply: status.last_detail.clone(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::RecipientReport;
    use tsubame_config::Config;
    use tsubame_queue::{SchedulerConfig, Timestamp};
    use tsubame_spool::SpoolOptions;

    const UPSTREAMS: &str = r#"
[[listener]]
address = "127.0.0.1:2525"

[[upstream]]
name = "a"
kind = "smtp"
host = "127.0.0.1"
port = 2601
tls = "none"

[[upstream]]
name = "b"
kind = "smtp"
host = "127.0.0.1"
port = 2602
tls = "none"

[[upstream]]
name = "old"
kind = "smtp"
host = "127.0.0.1"
port = 2603
tls = "none"
"#;

    fn config(default_upstream: &str, routes: &str) -> Config {
        Config::parse(
            &format!("[delivery]\ndefault_upstream = \"{default_upstream}\"\n{UPSTREAMS}{routes}"),
            "test",
        )
        .unwrap()
    }

    fn index_in(upstreams: &[Arc<Upstream>]) -> impl Fn(&str) -> Option<usize> + '_ {
        |name| {
            upstreams
                .iter()
                .position(|upstream| upstream.name() == name)
        }
    }

    /// A dispatcher on a fresh spool with upstreams a, b, old (and mx), `default`
    /// and `routes` as given.
    fn dispatcher(directory: &std::path::Path, config: &Config) -> Dispatcher {
        let upstreams =
            crate::upstream::build_table(config, "relay.test", &Default::default()).unwrap();
        let router = Router::new(config, index_in(&upstreams));
        let scheduler = Scheduler::new(SchedulerConfig {
            routes: upstreams.iter().map(|u| u.route_limits()).collect(),
            ..SchedulerConfig::default()
        })
        .unwrap();
        let (spool, _) = Spool::open(directory, SpoolOptions::default()).unwrap();
        let job_queues = upstreams.iter().map(|_| Arc::default()).collect();
        Dispatcher::new(
            scheduler,
            spool,
            upstreams,
            job_queues,
            router,
            Arc::default(),
            "relay.test".to_string(),
            RetrySchedule::default(),
            false,
            Arc::default(),
            None,
            directory.join("held.json"),
            None,
        )
    }

    /// Appends a message for `recipients` to the spool and hands it to the dispatcher.
    fn accept(dispatcher: &mut Dispatcher, recipients: &[&str]) -> MessageKey {
        let recipients: Vec<String> = recipients.iter().map(|r| r.to_string()).collect();
        let client_address = std::net::SocketAddr::from(([127, 0, 0, 1], 40000));
        let envelope = Envelope {
            received_at_unix_ms: now_unix_ms(),
            client_address,
            helo: "client.test",
            authenticated_user: None,
            mail_from: "sender@example.com",
            mail_parameters: "",
            recipients: &recipients,
        };
        let receipt = dispatcher
            .spool
            .append_message(&envelope, b"Subject: t\r\n\r\nbody\r\n")
            .unwrap();
        let message = SpooledMessage {
            id: receipt.id,
            location: receipt.location,
            received_at_unix_ms: envelope.received_at_unix_ms,
            client_address: client_address.to_string(),
            helo: "client.test".to_string(),
            authenticated_user: None,
            mail_from: "sender@example.com".to_string(),
            mail_parameters: String::new(),
            recipient_states: vec![tsubame_spool::RecipientState::default(); recipients.len()],
            recipients,
            body_size_bytes: 20,
            state: tsubame_spool::MessageState::Queued,
            added_fields: None,
        };
        dispatcher.accept(message, None);
        MessageKey(receipt.id.0)
    }

    fn upstream_of(dispatcher: &Dispatcher, key: MessageKey, recipient: usize) -> usize {
        dispatcher.messages[&key].recipients[recipient].upstream
    }

    #[test]
    fn a_reload_moves_queued_recipients_off_a_retired_upstream_and_in_flight_ones_after_their_attempt()
     {
        let directory = tempfile::tempdir().unwrap();
        let routes = "[[route]]\nrecipient_domains = [\"stuck.example\"]\nupstream = \"old\"\n";
        let before = config("a", routes);
        let mut dispatcher = dispatcher(directory.path(), &before);
        let (a, b, old) = (0, 1, 2);

        // In flight on `old`: handed to its queue.
        let in_flight = accept(&mut dispatcher, &["x@stuck.example", "y@example.net"]);
        dispatcher.dispatch(timestamp(now_unix_ms()));
        let item = dispatcher.job_queues[old]
            .take_where(|_| true)
            .pop()
            .unwrap();
        // Queued on `old`, not handed out (as if the upstream were at its limit).
        dispatcher.hold = true;
        let queued = accept(&mut dispatcher, &["z@stuck.example"]);
        assert_eq!(upstream_of(&dispatcher, queued, 0), old);
        // Stays where it is: its upstream is not retired.
        assert_eq!(upstream_of(&dispatcher, in_flight, 1), a);

        // The new configuration drops `old` and its route; the rest goes to b.
        let after = config("b", "");
        let table = dispatcher.upstreams.clone();
        let moved = dispatcher.reload(ReloadPlan {
            router: Router::new(&after, |name| {
                (name != "old").then(|| index_in(&table)(name)).flatten()
            }),
            upstreams: table.clone(),
            added: Vec::new(),
            retired: vec![old],
        });
        assert_eq!(
            moved, 1,
            "the queued recipient moves now, the one in flight later"
        );
        assert_eq!(upstream_of(&dispatcher, queued, 0), b);
        assert_eq!(dispatcher.scheduler.ready_count(RouteId(b as u32)), 1);
        assert_eq!(upstream_of(&dispatcher, in_flight, 0), old);
        assert_eq!(
            upstream_of(&dispatcher, in_flight, 1),
            a,
            "unchanged upstream: stays"
        );
        assert!(
            dispatcher.job_queues[old].push(item_clone(&item)).is_err(),
            "a retired upstream's queue takes no new jobs"
        );

        // The attempt on `old` is deferred: the recipient moves to b, its attempt counted.
        dispatcher.report(Report {
            job: item.job,
            message: Arc::clone(&item.meta),
            upstream: old,
            recipients: vec![RecipientReport {
                recipient: RecipientIndex(0),
                outcome: Outcome::Deferred,
                detail: "421 try later".to_string(),
                status: "4.0.0".to_string(),
                remote: None,
                tls: None,
                spill: false,
            }],
            attempt_ms: 1,
            message_id: None,
        });
        assert_eq!(upstream_of(&dispatcher, in_flight, 0), b);
        assert_eq!(dispatcher.messages[&in_flight].recipients[0].attempts, 1);
        dispatcher.scheduler.check_invariants().unwrap();
        // Once due, it is handed to b's queue, and nothing more to the retired one.
        dispatcher.hold = false;
        // Past any first retry delay (5 minutes, jitter included), within the maximum age.
        let later = Timestamp::from_unix_ms(now_unix_ms() + 2 * 3600 * 1000);
        let events = dispatcher.scheduler.advance(later);
        assert!(events.is_empty(), "{events:?}");
        dispatcher.dispatch(later);
        assert_eq!(dispatcher.job_queues[old].take_where(|_| true).len(), 0);
        let at_b = dispatcher.job_queues[b].take_where(|_| true);
        let keys: Vec<u64> = at_b.iter().map(|item| item.meta.message.id.0).collect();
        assert!(
            keys.contains(&in_flight.0) && keys.contains(&queued.0),
            "{keys:?}"
        );
        dispatcher.spool.shutdown();
    }

    fn item_clone(item: &WorkItem) -> WorkItem {
        WorkItem {
            job: item.job,
            meta: Arc::clone(&item.meta),
            recipients: item.recipients.clone(),
        }
    }
}
