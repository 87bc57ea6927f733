use super::*;
use proptest::prelude::*;

const SECOND_MS: u64 = 1_000;
const MINUTE_MS: u64 = 60 * SECOND_MS;
const HOUR_MS: u64 = 60 * MINUTE_MS;

fn at(unix_ms: u64) -> Timestamp {
    Timestamp::from_unix_ms(unix_ms)
}

fn config(routes: Vec<RouteLimits>) -> SchedulerConfig {
    SchedulerConfig {
        jitter_fraction: 0.0,
        routes,
        ..SchedulerConfig::default()
    }
}

fn unlimited(max_concurrent: usize) -> RouteLimits {
    RouteLimits {
        max_concurrent,
        rate_per_second: None,
    }
}

fn scheduler(routes: Vec<RouteLimits>) -> Scheduler {
    Scheduler::new(config(routes)).unwrap()
}

fn rcpts(route: u32, count: u32) -> Vec<(RecipientIndex, RouteId)> {
    (0..count)
        .map(|i| (RecipientIndex(i), RouteId(route)))
        .collect()
}

/// Completes every recipient of `job` with `outcome`, collecting the events.
fn complete_all(s: &mut Scheduler, job: &Job, outcome: Outcome, now: Timestamp) -> Vec<Event> {
    let mut events = Vec::new();
    for r in &job.recipients {
        events.extend(s.complete(job.id, r.recipient, outcome, now).unwrap());
    }
    events
}

#[test]
fn exponential_backoff_sequence_and_cap() {
    let schedule = RetrySchedule::Exponential {
        initial_ms: MINUTE_MS,
        factor: 2.0,
        max_ms: HOUR_MS,
    };
    let cases: &[(u32, u64)] = &[
        (0, MINUTE_MS),
        (1, MINUTE_MS),
        (2, 2 * MINUTE_MS),
        (3, 4 * MINUTE_MS),
        (6, 32 * MINUTE_MS),
        (7, HOUR_MS),
        (50, HOUR_MS),
        (u32::MAX, HOUR_MS),
    ];
    for &(attempts, expected_ms) in cases {
        assert_eq!(
            schedule.delay_ms(attempts),
            expected_ms,
            "attempts {attempts}"
        );
    }
}

#[test]
fn explicit_schedule_repeats_last_entry() {
    let schedule = RetrySchedule::Explicit {
        delays_ms: vec![10, 20, 30],
    };
    let cases: &[(u32, u64)] = &[(1, 10), (2, 20), (3, 30), (4, 30), (1_000, 30)];
    for &(attempts, expected_ms) in cases {
        assert_eq!(
            schedule.delay_ms(attempts),
            expected_ms,
            "attempts {attempts}"
        );
    }
}

#[test]
fn invalid_configs_are_refused() {
    let cases: Vec<(&str, SchedulerConfig)> = vec![
        ("no routes", config(vec![])),
        ("zero concurrency", config(vec![unlimited(0)])),
        (
            "negative rate",
            config(vec![RouteLimits {
                max_concurrent: 1,
                rate_per_second: Some(-1.0),
            }]),
        ),
        (
            "jitter 1",
            SchedulerConfig {
                jitter_fraction: 1.0,
                ..SchedulerConfig::default()
            },
        ),
        (
            "empty explicit",
            SchedulerConfig {
                retry: RetrySchedule::Explicit { delays_ms: vec![] },
                ..SchedulerConfig::default()
            },
        ),
        (
            "shrinking factor",
            SchedulerConfig {
                retry: RetrySchedule::Exponential {
                    initial_ms: 1,
                    factor: 0.5,
                    max_ms: 10,
                },
                ..SchedulerConfig::default()
            },
        ),
        (
            "max below initial",
            SchedulerConfig {
                retry: RetrySchedule::Exponential {
                    initial_ms: 10,
                    factor: 2.0,
                    max_ms: 1,
                },
                ..SchedulerConfig::default()
            },
        ),
    ];
    for (name, config) in cases {
        assert!(
            matches!(Scheduler::new(config), Err(Error::InvalidConfig(_))),
            "{name}"
        );
    }
    assert!(Scheduler::new(SchedulerConfig::default()).is_ok());
}

/// Defers one recipient `rounds` times and returns the delays the scheduler chose.
fn deferral_delays(seed: u64, jitter_fraction: f64, rounds: u32) -> Vec<u64> {
    let mut s = Scheduler::new(SchedulerConfig {
        retry: RetrySchedule::Explicit {
            delays_ms: vec![100 * SECOND_MS],
        },
        jitter_fraction,
        seed,
        ..SchedulerConfig::default()
    })
    .unwrap();
    s.insert(MessageKey(1), at(0), &rcpts(0, 1), at(0)).unwrap();
    let mut now = at(0);
    let mut delays = Vec::new();
    for _ in 0..rounds {
        let job = s.next_job(RouteId(0), now, 10).unwrap().unwrap();
        complete_all(&mut s, &job, Outcome::Deferred, now);
        let due = s.next_wakeup().unwrap();
        delays.push(due.unix_ms - now.unix_ms);
        now = due;
        s.advance(now);
    }
    delays
}

#[test]
fn jitter_stays_within_fraction_and_is_deterministic() {
    let first = deferral_delays(7, 0.1, 200);
    assert_eq!(
        first,
        deferral_delays(7, 0.1, 200),
        "same seed, same delays"
    );
    assert_ne!(
        first,
        deferral_delays(8, 0.1, 200),
        "another seed, other delays"
    );
    for &delay in &first {
        assert!(
            (90 * SECOND_MS..=110 * SECOND_MS).contains(&delay),
            "{delay}"
        );
    }
    // Not all the same: jitter actually spreads.
    assert!(first.iter().any(|&d| d != first[0]));
    assert!(
        deferral_delays(7, 0.0, 5)
            .iter()
            .all(|&d| d == 100 * SECOND_MS)
    );
}

#[test]
fn concurrency_limit_enforced_and_released() {
    let mut s = scheduler(vec![unlimited(2)]);
    for message in 0..3 {
        s.insert(MessageKey(message), at(0), &rcpts(0, 1), at(0))
            .unwrap();
    }
    let first = s.next_job(RouteId(0), at(0), 10).unwrap().unwrap();
    let _second = s.next_job(RouteId(0), at(0), 10).unwrap().unwrap();
    assert_eq!(s.in_flight(RouteId(0)), 2);
    assert_eq!(s.next_job(RouteId(0), at(0), 10).unwrap(), None);
    complete_all(&mut s, &first, Outcome::Delivered, at(1));
    assert_eq!(s.in_flight(RouteId(0)), 1);
    assert!(s.next_job(RouteId(0), at(1), 10).unwrap().is_some());
    s.check_invariants().unwrap();
}

#[test]
fn job_slot_held_until_last_recipient_completes() {
    let mut s = scheduler(vec![unlimited(1)]);
    s.insert(MessageKey(1), at(0), &rcpts(0, 3), at(0)).unwrap();
    s.insert(MessageKey(2), at(0), &rcpts(0, 1), at(0)).unwrap();
    let job = s.next_job(RouteId(0), at(0), 10).unwrap().unwrap();
    assert_eq!(job.message, MessageKey(1));
    assert_eq!(job.recipients.len(), 3, "one transaction for all three");
    s.complete(job.id, RecipientIndex(0), Outcome::Delivered, at(0))
        .unwrap();
    s.complete(job.id, RecipientIndex(1), Outcome::Delivered, at(0))
        .unwrap();
    assert_eq!(s.next_job(RouteId(0), at(0), 10).unwrap(), None);
    s.complete(job.id, RecipientIndex(2), Outcome::Delivered, at(0))
        .unwrap();
    assert!(s.next_job(RouteId(0), at(0), 10).unwrap().is_some());
}

#[test]
fn batch_respects_max_recipients() {
    let mut s = scheduler(vec![unlimited(10)]);
    s.insert(MessageKey(1), at(0), &rcpts(0, 5), at(0)).unwrap();
    let sizes: Vec<usize> = (0..4)
        .filter_map(|_| s.next_job(RouteId(0), at(0), 2).unwrap())
        .map(|job| job.recipients.len())
        .collect();
    assert_eq!(sizes, vec![2, 2, 1]);
    s.check_invariants().unwrap();
}

#[test]
fn token_bucket_rate_limit() {
    let mut s = scheduler(vec![RouteLimits {
        max_concurrent: 100,
        rate_per_second: Some(2.0),
    }]);
    for message in 0..10 {
        s.insert(MessageKey(message), at(0), &rcpts(0, 1), at(0))
            .unwrap();
    }
    // Burst of 2, then one every 500 ms.
    let cases: &[(u64, usize)] = &[(0, 2), (499, 0), (500, 1), (999, 0), (1_000, 1), (3_000, 2)];
    for &(now_ms, expected) in cases {
        let mut started = 0;
        while s.next_job(RouteId(0), at(now_ms), 1).unwrap().is_some() {
            started += 1;
        }
        assert_eq!(started, expected, "at {now_ms} ms");
    }
    assert_eq!(s.next_wakeup(), Some(at(3_500)));
}

#[test]
fn deferred_becomes_ready_exactly_at_due_time() {
    let mut s = scheduler(vec![unlimited(1)]);
    s.insert(MessageKey(1), at(0), &rcpts(0, 1), at(0)).unwrap();
    let job = s.next_job(RouteId(0), at(0), 1).unwrap().unwrap();
    assert_eq!(job.recipients[0].attempt, 1);
    assert!(complete_all(&mut s, &job, Outcome::Deferred, at(10)).is_empty());
    assert_eq!(s.deferred_count(), 1);
    let due = at(10 + DEFAULT_INITIAL_DELAY_MS);
    assert_eq!(s.next_wakeup(), Some(due));
    s.advance(at(due.unix_ms - 1));
    assert_eq!(
        s.next_job(RouteId(0), at(due.unix_ms - 1), 1).unwrap(),
        None
    );
    assert!(s.advance(due).is_empty());
    assert_eq!(s.deferred_count(), 0);
    let retry = s.next_job(RouteId(0), due, 1).unwrap().unwrap();
    assert_eq!(retry.recipients[0].attempt, 2);
    s.check_invariants().unwrap();
}

#[test]
fn max_age_expires_deferred_recipient() {
    let mut s = Scheduler::new(SchedulerConfig {
        max_age_ms: 10 * MINUTE_MS,
        jitter_fraction: 0.0,
        ..SchedulerConfig::default()
    })
    .unwrap();
    s.insert(MessageKey(1), at(0), &rcpts(0, 2), at(0)).unwrap();
    let job = s.next_job(RouteId(0), at(0), 10).unwrap().unwrap();
    s.complete(job.id, RecipientIndex(0), Outcome::Delivered, at(0))
        .unwrap();
    // Deferred at 8 minutes: the 5-minute retry would be past the 10-minute age, so
    // the timer fires at the expiry instead.
    s.complete(
        job.id,
        RecipientIndex(1),
        Outcome::Deferred,
        at(8 * MINUTE_MS),
    )
    .unwrap();
    assert_eq!(s.next_wakeup(), Some(at(10 * MINUTE_MS)));
    let events = s.advance(at(10 * MINUTE_MS));
    assert_eq!(
        events,
        vec![
            Event::Expired {
                message: MessageKey(1),
                recipient: RecipientIndex(1)
            },
            Event::MessageDone {
                message: MessageKey(1)
            },
        ]
    );
    assert_eq!(s.pending_count(), 0);
    assert_eq!(s.message_count(), 0);
}

#[test]
fn deferral_after_max_age_expires_at_once() {
    let mut s = Scheduler::new(SchedulerConfig {
        max_age_ms: MINUTE_MS,
        ..SchedulerConfig::default()
    })
    .unwrap();
    s.insert(MessageKey(1), at(0), &rcpts(0, 1), at(0)).unwrap();
    let job = s.next_job(RouteId(0), at(0), 1).unwrap().unwrap();
    let events = complete_all(&mut s, &job, Outcome::Deferred, at(MINUTE_MS));
    assert_eq!(events.len(), 2);
    assert!(matches!(events[0], Event::Expired { .. }));
    assert!(matches!(events[1], Event::MessageDone { .. }));
}

#[test]
fn message_done_exactly_once_with_mixed_outcomes() {
    let outcomes = [Outcome::Delivered, Outcome::Failed, Outcome::Delivered];
    let mut s = scheduler(vec![unlimited(10)]);
    s.insert(MessageKey(9), at(0), &rcpts(0, 3), at(0)).unwrap();
    let job = s.next_job(RouteId(0), at(0), 10).unwrap().unwrap();
    let mut done = 0;
    for (position, (r, outcome)) in job.recipients.iter().zip(outcomes).enumerate() {
        let events = s.complete(job.id, r.recipient, outcome, at(0)).unwrap();
        let is_last = position == outcomes.len() - 1;
        assert_eq!(
            events,
            if is_last {
                vec![Event::MessageDone {
                    message: MessageKey(9),
                }]
            } else {
                vec![]
            }
        );
        done += events.len();
    }
    assert_eq!(done, 1);
    s.check_invariants().unwrap();
}

#[test]
fn two_routes_of_one_message_are_independent() {
    let mut s = scheduler(vec![unlimited(1), unlimited(1)]);
    let recipients = [
        (RecipientIndex(0), RouteId(0)),
        (RecipientIndex(1), RouteId(1)),
        (RecipientIndex(2), RouteId(0)),
    ];
    s.insert(MessageKey(1), at(0), &recipients, at(0)).unwrap();
    let a = s.next_job(RouteId(0), at(0), 10).unwrap().unwrap();
    let b = s.next_job(RouteId(1), at(0), 10).unwrap().unwrap();
    let indexes = |job: &Job| {
        job.recipients
            .iter()
            .map(|r| r.recipient.0)
            .collect::<Vec<_>>()
    };
    assert_eq!(indexes(&a), vec![0, 2]);
    assert_eq!(indexes(&b), vec![1]);
    assert!(complete_all(&mut s, &b, Outcome::Deferred, at(0)).is_empty());
    assert!(complete_all(&mut s, &a, Outcome::Delivered, at(0)).is_empty());
    assert_eq!(s.pending_count(), 1);
    s.advance(at(DEFAULT_INITIAL_DELAY_MS));
    assert_eq!(s.ready_count(RouteId(1)), 1);
    assert_eq!(s.ready_count(RouteId(0)), 0);
    let b = s
        .next_job(RouteId(1), at(DEFAULT_INITIAL_DELAY_MS), 10)
        .unwrap()
        .unwrap();
    let events = complete_all(&mut s, &b, Outcome::Delivered, at(DEFAULT_INITIAL_DELAY_MS));
    assert_eq!(
        events,
        vec![Event::MessageDone {
            message: MessageKey(1)
        }]
    );
}

#[test]
fn remove_message_forgets_it_and_ignores_in_flight_outcomes() {
    let mut s = scheduler(vec![unlimited(1)]);
    s.insert(MessageKey(1), at(0), &rcpts(0, 2), at(0)).unwrap();
    let job = s.next_job(RouteId(0), at(0), 1).unwrap().unwrap();
    assert_eq!(s.remove_message(MessageKey(1)), Ok(2));
    assert_eq!(s.pending_count(), 0);
    assert_eq!(s.in_flight(RouteId(0)), 1, "the connection is still busy");
    assert!(complete_all(&mut s, &job, Outcome::Delivered, at(0)).is_empty());
    assert_eq!(s.in_flight(RouteId(0)), 0);
    assert_eq!(s.next_job(RouteId(0), at(0), 1).unwrap(), None);
    assert_eq!(
        s.remove_message(MessageKey(1)),
        Err(Error::UnknownMessage(MessageKey(1)))
    );
    s.check_invariants().unwrap();
}

#[test]
fn flush_makes_deferred_ready_now() {
    let mut s = scheduler(vec![unlimited(10)]);
    for message in 0..3 {
        s.insert(MessageKey(message), at(0), &rcpts(0, 1), at(0))
            .unwrap();
        let job = s.next_job(RouteId(0), at(0), 1).unwrap().unwrap();
        complete_all(&mut s, &job, Outcome::Deferred, at(0));
    }
    assert_eq!(s.deferred_count(), 3);
    assert_eq!(s.flush(), 3);
    assert_eq!(s.deferred_count(), 0);
    assert_eq!(s.ready_count(RouteId(0)), 3);
    // The old timers are stale: advancing past them changes nothing.
    assert!(s.advance(at(HOUR_MS)).is_empty());
    assert_eq!(s.ready_count(RouteId(0)), 3);
    s.check_invariants().unwrap();
}

#[test]
fn hold_and_release() {
    let mut s = scheduler(vec![unlimited(10)]);
    s.insert(MessageKey(1), at(0), &rcpts(0, 3), at(0)).unwrap();
    // Recipient 0 deferred, 1 in flight, 2 ready.
    let job = s.next_job(RouteId(0), at(0), 1).unwrap().unwrap();
    complete_all(&mut s, &job, Outcome::Deferred, at(0));
    let in_flight = s.next_job(RouteId(0), at(0), 1).unwrap().unwrap();
    s.hold(MessageKey(1)).unwrap();
    s.hold(MessageKey(1)).unwrap();
    assert_eq!(s.counts().held, 2);
    assert_eq!(s.next_job(RouteId(0), at(0), 10).unwrap(), None);
    complete_all(&mut s, &in_flight, Outcome::Deferred, at(0));
    assert_eq!(s.counts().held, 3);
    // Held recipients neither become ready nor expire.
    assert!(s.advance(at(DEFAULT_MAX_AGE_MS * 2)).is_empty());
    s.check_invariants().unwrap();
    s.release(MessageKey(1), at(1)).unwrap();
    let counts = s.counts();
    assert_eq!((counts.held, counts.ready, counts.deferred), (0, 1, 2));
    s.check_invariants().unwrap();
    assert_eq!(
        s.hold(MessageKey(2)),
        Err(Error::UnknownMessage(MessageKey(2)))
    );
}

#[test]
fn flushing_one_message_moves_only_its_deferred_recipients() {
    let mut s = scheduler(vec![unlimited(10)]);
    s.insert(MessageKey(1), at(0), &rcpts(0, 2), at(0)).unwrap();
    s.insert(MessageKey(2), at(0), &rcpts(0, 1), at(0)).unwrap();
    let job = s.next_job(RouteId(0), at(0), 10).unwrap().unwrap();
    complete_all(&mut s, &job, Outcome::Deferred, at(0));
    let job = s.next_job(RouteId(0), at(0), 10).unwrap().unwrap();
    complete_all(&mut s, &job, Outcome::Deferred, at(0));
    assert_eq!(s.counts().deferred, 3);
    assert_eq!(s.flush_message(MessageKey(1)), Ok(2));
    let counts = s.counts();
    assert_eq!((counts.ready, counts.deferred), (2, 1));
    assert_eq!(s.flush_message(MessageKey(1)), Ok(0));
    // A held message stays held.
    s.hold(MessageKey(2)).unwrap();
    assert!(s.is_held(MessageKey(2)));
    assert_eq!(s.flush_message(MessageKey(2)), Ok(0));
    assert_eq!(s.counts().held, 1);
    s.check_invariants().unwrap();
    assert_eq!(
        s.flush_message(MessageKey(3)),
        Err(Error::UnknownMessage(MessageKey(3)))
    );
}

#[test]
fn completing_unknown_or_finished_job_is_an_error() {
    let mut s = scheduler(vec![unlimited(1)]);
    s.insert(MessageKey(1), at(0), &rcpts(0, 1), at(0)).unwrap();
    assert_eq!(
        s.complete(JobId(99), RecipientIndex(0), Outcome::Delivered, at(0)),
        Err(Error::UnknownJob(JobId(99)))
    );
    let job = s.next_job(RouteId(0), at(0), 1).unwrap().unwrap();
    assert_eq!(
        s.complete(job.id, RecipientIndex(5), Outcome::Delivered, at(0)),
        Err(Error::RecipientNotInJob {
            job: job.id,
            recipient: RecipientIndex(5)
        })
    );
    complete_all(&mut s, &job, Outcome::Delivered, at(0));
    assert_eq!(
        s.complete(job.id, RecipientIndex(0), Outcome::Delivered, at(0)),
        Err(Error::UnknownJob(job.id))
    );
}

/// A recipient list as `insert` takes it.
type RecipientList<'a> = &'a [(RecipientIndex, RouteId)];

#[test]
fn insert_refusals() {
    let mut s = scheduler(vec![unlimited(1)]);
    s.insert(MessageKey(1), at(0), &rcpts(0, 1), at(0)).unwrap();
    let duplicate_recipient = [
        (RecipientIndex(3), RouteId(0)),
        (RecipientIndex(3), RouteId(0)),
    ];
    let one_on_route_0 = rcpts(0, 1);
    let one_on_route_7 = rcpts(7, 1);
    let cases: Vec<(RecipientList<'_>, u64, Error)> = vec![
        (&[], 2, Error::NoRecipients(MessageKey(2))),
        (&one_on_route_0, 1, Error::DuplicateMessage(MessageKey(1))),
        (&one_on_route_7, 2, Error::UnknownRoute(RouteId(7))),
        (
            &duplicate_recipient,
            2,
            Error::DuplicateRecipient {
                message: MessageKey(2),
                recipient: RecipientIndex(3),
            },
        ),
    ];
    for (recipients, message, expected) in cases {
        assert_eq!(
            s.insert(MessageKey(message), at(0), recipients, at(0)),
            Err(expected)
        );
    }
    assert_eq!(s.pending_count(), 1);
    assert_eq!(
        s.next_job(RouteId(3), at(0), 1),
        Err(Error::UnknownRoute(RouteId(3)))
    );
    s.check_invariants().unwrap();
}

#[test]
fn recovered_recipients_keep_attempts_and_due_times() {
    let mut s = scheduler(vec![unlimited(10)]);
    let recovered = [
        RecoveredRecipient {
            recipient: RecipientIndex(0),
            route: RouteId(0),
            attempts: 3,
            next_attempt_at: Some(at(500)),
        },
        RecoveredRecipient {
            recipient: RecipientIndex(1),
            route: RouteId(0),
            attempts: 1,
            next_attempt_at: Some(at(50)),
        },
    ];
    s.insert_recovered(MessageKey(1), at(0), &recovered, at(100))
        .unwrap();
    assert_eq!((s.ready_count(RouteId(0)), s.deferred_count()), (1, 1));
    assert_eq!(s.next_wakeup(), Some(at(500)));
    let job = s.next_job(RouteId(0), at(100), 10).unwrap().unwrap();
    assert_eq!(
        job.recipients,
        vec![JobRecipient {
            recipient: RecipientIndex(1),
            attempt: 2
        }]
    );
    s.advance(at(500));
    let job = s.next_job(RouteId(0), at(500), 10).unwrap().unwrap();
    assert_eq!(job.recipients[0].attempt, 4);
    s.check_invariants().unwrap();
}

#[test]
fn stale_queue_entries_are_compacted() {
    let mut s = scheduler(vec![unlimited(1)]);
    for message in 0..5_000 {
        s.insert(MessageKey(message), at(0), &rcpts(0, 1), at(0))
            .unwrap();
        s.hold(MessageKey(message)).unwrap();
    }
    assert_eq!(s.ready_count(RouteId(0)), 0);
    let queued = s.routes[0].ready.len();
    assert!(
        queued <= COMPACTION_SLACK_ENTRIES + 1,
        "{queued} entries left"
    );
}

// ---- property test: random operations never lose or duplicate a recipient ----

#[derive(Debug, Clone)]
enum Op {
    Insert { recipients: u8, two_routes: bool },
    NextJob { route: u32, max: u8 },
    Complete { pick: usize, outcome: u8 },
    Advance,
    Tick { ms: u64 },
    Hold { pick: usize },
    Release { pick: usize },
    Flush,
    Remove { pick: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1u8..6, any::<bool>()).prop_map(|(recipients, two_routes)| Op::Insert { recipients, two_routes }),
        5 => (0u32..2, 1u8..4).prop_map(|(route, max)| Op::NextJob { route, max }),
        6 => (any::<usize>(), 0u8..3).prop_map(|(pick, outcome)| Op::Complete { pick, outcome }),
        2 => Just(Op::Advance),
        3 => (0u64..2 * HOUR_MS).prop_map(|ms| Op::Tick { ms }),
        1 => any::<usize>().prop_map(|pick| Op::Hold { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        1 => Just(Op::Flush),
        1 => any::<usize>().prop_map(|pick| Op::Remove { pick }),
    ]
}

/// What the model expects of each (message, recipient): pending or final.
#[derive(Default)]
struct Model {
    pending: std::collections::BTreeSet<(u64, u32)>,
    done: std::collections::BTreeSet<u64>,
    removed: std::collections::BTreeSet<u64>,
    /// Handed out and not yet completed: (job, message, recipient).
    outstanding: Vec<(JobId, u64, u32)>,
    messages: u64,
}

impl Model {
    fn apply(&mut self, events: Vec<Event>) {
        for event in events {
            match event {
                Event::Expired { message, recipient } => {
                    assert!(
                        self.pending.remove(&(message.0, recipient.0)),
                        "expired twice"
                    );
                }
                Event::MessageDone { message } => {
                    assert!(
                        self.done.insert(message.0),
                        "MessageDone twice for {message:?}"
                    );
                    assert!(
                        !self.pending.iter().any(|&(m, _)| m == message.0),
                        "done with pending recipients"
                    );
                }
            }
        }
    }

    fn live_message(&self, pick: usize) -> Option<u64> {
        let live: Vec<u64> = (0..self.messages)
            .filter(|m| !self.done.contains(m) && !self.removed.contains(m))
            .collect();
        (!live.is_empty()).then(|| live[pick % live.len()])
    }
}

fn limits() -> Vec<RouteLimits> {
    vec![
        RouteLimits {
            max_concurrent: 2,
            rate_per_second: Some(0.5),
        },
        unlimited(3),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_operations_keep_every_recipient(ops in proptest::collection::vec(op(), 1..120), seed in any::<u64>()) {
        let mut s = Scheduler::new(SchedulerConfig {
            seed,
            max_age_ms: 12 * HOUR_MS,
            routes: limits(),
            ..SchedulerConfig::default()
        }).unwrap();
        let mut model = Model::default();
        let mut now = at(0);
        for op in ops {
            match op {
                Op::Insert { recipients, two_routes } => {
                    let message = model.messages;
                    model.messages += 1;
                    let list: Vec<_> = (0..u32::from(recipients))
                        .map(|i| (RecipientIndex(i), RouteId(if two_routes { i % 2 } else { 0 })))
                        .collect();
                    s.insert(MessageKey(message), now, &list, now).unwrap();
                    for i in 0..u32::from(recipients) {
                        model.pending.insert((message, i));
                    }
                }
                Op::NextJob { route, max } => {
                    if let Some(job) = s.next_job(RouteId(route), now, usize::from(max)).unwrap() {
                        prop_assert!(!job.recipients.is_empty() && job.recipients.len() <= usize::from(max));
                        for r in &job.recipients {
                            prop_assert!(model.pending.contains(&(job.message.0, r.recipient.0)));
                            prop_assert!(!model.outstanding.iter().any(|&(_, m, i)| m == job.message.0 && i == r.recipient.0), "handed out twice");
                            model.outstanding.push((job.id, job.message.0, r.recipient.0));
                        }
                    }
                }
                Op::Complete { pick, outcome } => {
                    if !model.outstanding.is_empty() {
                        let (job, message, recipient) = model.outstanding.swap_remove(pick % model.outstanding.len());
                        let outcome = [Outcome::Delivered, Outcome::Deferred, Outcome::Failed][usize::from(outcome)];
                        let events = s.complete(job, RecipientIndex(recipient), outcome, now).unwrap();
                        if outcome != Outcome::Deferred && !model.removed.contains(&message) {
                            prop_assert!(model.pending.remove(&(message, recipient)));
                        }
                        model.apply(events);
                        prop_assert!(s.complete(job, RecipientIndex(recipient), outcome, now).is_err());
                    }
                }
                Op::Advance => model.apply(s.advance(now)),
                Op::Tick { ms } => now = now.plus_ms(ms),
                Op::Hold { pick } => {
                    if let Some(message) = model.live_message(pick) {
                        s.hold(MessageKey(message)).unwrap();
                    }
                }
                Op::Release { pick } => {
                    if let Some(message) = model.live_message(pick) {
                        s.release(MessageKey(message), now).unwrap();
                    }
                }
                Op::Flush => { s.flush(); }
                Op::Remove { pick } => {
                    if let Some(message) = model.live_message(pick) {
                        let pending = model.pending.iter().filter(|&&(m, _)| m == message).count();
                        prop_assert_eq!(s.remove_message(MessageKey(message)).unwrap(), pending);
                        model.pending.retain(|&(m, _)| m != message);
                        model.removed.insert(message);
                    }
                }
            }
            prop_assert_eq!(s.pending_count(), model.pending.len());
            for route in 0..2 {
                prop_assert!(s.in_flight(RouteId(route)) <= limits()[route as usize].max_concurrent);
            }
            if let Err(violation) = s.check_invariants() {
                prop_assert!(false, "{}", violation);
            }
        }

        // Drain: release everything, then deliver or fail whatever comes up; every
        // message not removed must report MessageDone exactly once.
        for message in 0..model.messages {
            if !model.done.contains(&message) && !model.removed.contains(&message) {
                s.release(MessageKey(message), now).unwrap();
            }
        }
        for (job, message, recipient) in std::mem::take(&mut model.outstanding) {
            let events = s.complete(job, RecipientIndex(recipient), Outcome::Delivered, now).unwrap();
            if !model.removed.contains(&message) {
                model.pending.remove(&(message, recipient));
            }
            model.apply(events);
        }
        for _ in 0..10_000 {
            if s.pending_count() == 0 {
                break;
            }
            model.apply(s.advance(now));
            let mut progressed = false;
            for route in 0..2 {
                while let Some(job) = s.next_job(RouteId(route), now, 10).unwrap() {
                    progressed = true;
                    for r in &job.recipients {
                        let outcome = if r.recipient.0 % 3 == 0 { Outcome::Failed } else { Outcome::Delivered };
                        model.pending.remove(&(job.message.0, r.recipient.0));
                        model.apply(s.complete(job.id, r.recipient, outcome, now).unwrap());
                    }
                }
            }
            if !progressed {
                now = s.next_wakeup().map_or(now.plus_ms(1), |t| t.max(now.plus_ms(1)));
            }
        }
        prop_assert_eq!(s.pending_count(), 0);
        prop_assert!(model.pending.is_empty());
        for message in 0..model.messages {
            prop_assert_eq!(model.done.contains(&message), !model.removed.contains(&message), "message {}", message);
        }
    }
}

#[test]
fn an_added_route_takes_the_next_id_and_hands_out_jobs() {
    let mut s = scheduler(vec![unlimited(1)]);
    let added = s.add_route(unlimited(2)).unwrap();
    assert_eq!(added, RouteId(1));
    s.insert(MessageKey(1), at(0), &rcpts(1, 1), at(0)).unwrap();
    let job = s.next_job(added, at(0), 10).unwrap().unwrap();
    assert_eq!(job.route, added);
    assert_eq!(s.in_flight(added), 1);
    s.check_invariants().unwrap();
    assert_eq!(
        s.add_route(unlimited(0)),
        Err(Error::InvalidConfig("route max_concurrent must be >= 1"))
    );
}

#[test]
fn reroute_moves_ready_deferred_and_held_recipients_and_keeps_attempts() {
    let mut s = scheduler(vec![unlimited(5), unlimited(5)]);
    let (old, new) = (RouteId(0), RouteId(1));
    // Message 1: recipient 0 ready, recipient 1 deferred after one attempt.
    s.insert(MessageKey(1), at(0), &rcpts(0, 2), at(0)).unwrap();
    let job = s.next_job(old, at(0), 1).unwrap().unwrap();
    let deferred = job.recipients[0].recipient;
    s.complete(job.id, deferred, Outcome::Deferred, at(0))
        .unwrap();
    let ready = RecipientIndex(1 - deferred.0);
    // Message 2: held.
    s.insert(MessageKey(2), at(0), &rcpts(0, 1), at(0)).unwrap();
    s.hold(MessageKey(2)).unwrap();
    // Message 3: in flight.
    s.insert(MessageKey(3), at(0), &rcpts(0, 1), at(0)).unwrap();
    s.flush_message(MessageKey(1)).unwrap();
    s.reroute(MessageKey(1), deferred, new).unwrap();
    s.check_invariants().unwrap();

    // Put the deferred one back in the heap to see its due time kept: defer it again.
    let mut s2 = scheduler(vec![unlimited(5), unlimited(5)]);
    s2.insert(MessageKey(9), at(0), &rcpts(0, 1), at(0))
        .unwrap();
    let job = s2.next_job(old, at(0), 1).unwrap().unwrap();
    s2.complete(job.id, RecipientIndex(0), Outcome::Deferred, at(0))
        .unwrap();
    assert_eq!(s2.reroute(MessageKey(9), RecipientIndex(0), new), Ok(true));
    assert!(
        s2.next_job(new, at(0), 1).unwrap().is_none(),
        "still deferred"
    );
    let due = s2.next_wakeup().unwrap();
    assert!(s2.advance(due).is_empty());
    let job = s2.next_job(new, due, 1).unwrap().unwrap();
    assert_eq!(job.recipients[0].attempt, 2, "attempts kept");
    s2.check_invariants().unwrap();

    assert_eq!(s.reroute(MessageKey(1), ready, new), Ok(true));
    assert_eq!(s.reroute(MessageKey(2), RecipientIndex(0), new), Ok(true));
    let in_flight = s.next_job(old, at(0), 1).unwrap().unwrap();
    assert_eq!(in_flight.message, MessageKey(3));
    assert_eq!(
        s.reroute(MessageKey(3), RecipientIndex(0), new),
        Ok(false),
        "in flight: moved when its job completes"
    );
    s.check_invariants().unwrap();
    assert_eq!(s.ready_count(old), 0);
    assert_eq!(s.ready_count(new), 2);
    let job = s.next_job(new, at(0), 10).unwrap().unwrap();
    assert_eq!(job.message, MessageKey(1));
    assert_eq!(job.recipients.len(), 2);
    s.release(MessageKey(2), at(0)).unwrap();
    assert_eq!(
        s.ready_count(new),
        1,
        "the held one comes back on the new route"
    );
    assert_eq!(
        s.reroute(MessageKey(7), RecipientIndex(0), new),
        Err(Error::UnknownMessage(MessageKey(7)))
    );
    assert_eq!(
        s.reroute(MessageKey(2), RecipientIndex(0), RouteId(5)),
        Err(Error::UnknownRoute(RouteId(5)))
    );
    s.check_invariants().unwrap();
}
