//! The delivery scheduler's hot path: every recipient is inserted, handed out in a job
//! and completed. Reported per recipient (`Throughput::Elements`).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tsubame_queue::{
    MessageKey, Outcome, RecipientIndex, RouteId, RouteLimits, Scheduler, SchedulerConfig,
    Timestamp,
};

/// Recipients per run: the size of a busy relay's queue after an upstream outage.
const RECIPIENTS: u32 = 100_000;
/// Routes the recipients are spread over.
const ROUTES: u32 = 8;

fn fresh_scheduler() -> Scheduler {
    let routes = (0..ROUTES)
        .map(|_| RouteLimits {
            max_concurrent: 20,
            rate_per_second: None,
        })
        .collect();
    Scheduler::new(SchedulerConfig {
        routes,
        ..SchedulerConfig::default()
    })
    .unwrap_or_else(|error| panic!("benchmark config refused: {error}"))
}

/// Inserts `RECIPIENTS` messages of `per_message` recipients each (spread over the
/// routes), then drains every route, completing each job at once. Every tenth
/// recipient is deferred, so the retry heap is exercised too.
fn run(per_message: u32) -> usize {
    let mut scheduler = fresh_scheduler();
    let now = Timestamp::from_unix_ms(1_700_000_000_000);
    let messages = RECIPIENTS / per_message;
    for message in 0..messages {
        let recipients: Vec<(RecipientIndex, RouteId)> = (0..per_message)
            .map(|i| (RecipientIndex(i), RouteId((message + i) % ROUTES)))
            .collect();
        let inserted = scheduler.insert(MessageKey(u64::from(message)), now, &recipients, now);
        debug_assert!(inserted.is_ok());
    }
    let mut events = 0;
    for route in 0..ROUTES {
        while let Ok(Some(job)) = scheduler.next_job(RouteId(route), now, 100) {
            for recipient in &job.recipients {
                let outcome = if recipient.recipient.0 % 10 == 9 {
                    Outcome::Deferred
                } else {
                    Outcome::Delivered
                };
                if let Ok(done) = scheduler.complete(job.id, recipient.recipient, outcome, now) {
                    events += done.len();
                }
            }
        }
    }
    events + scheduler.deferred_count()
}

fn scheduler(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("scheduler");
    group.sample_size(10);
    group.throughput(Throughput::Elements(u64::from(RECIPIENTS)));
    for per_message in [1, 10] {
        group.bench_function(
            format!("insert_job_complete/{per_message}_per_message"),
            |b| b.iter(|| black_box(run(per_message))),
        );
    }
    group.finish();
}

criterion_group!(benches, scheduler);
criterion_main!(benches);
