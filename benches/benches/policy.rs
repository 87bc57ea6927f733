//! The policy checks the server makes per transaction and per login attempt, reported per
//! check (`Throughput::Elements`).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tsubame_policy::{
    DEFAULT_LIMITER_MAX_KEYS, Key, Limiter, LoginGuard, LoginPolicy, RateLimits, Timestamp,
};

/// Distinct senders cycled through: enough to spill out of the CPU caches.
const KEYS: u32 = 10_000;
/// Checks per iteration.
const CHECKS: u32 = 10_000;

fn all_limits() -> RateLimits {
    RateLimits {
        messages_per_minute: Some(1_000),
        messages_per_hour: Some(10_000),
        messages_per_day: Some(100_000),
        recipients_per_minute: Some(10_000),
        recipients_per_hour: Some(100_000),
        recipients_per_day: Some(1_000_000),
    }
}

fn address(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i))
}

fn policy(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("policy");
    group.throughput(Throughput::Elements(u64::from(CHECKS)));

    let keys: Vec<Key> = (0..KEYS).map(|i| Key::ip(address(i))).collect();
    let mut limiter = Limiter::new(all_limits(), DEFAULT_LIMITER_MAX_KEYS)
        .unwrap_or_else(|error| panic!("benchmark limits refused: {error}"));
    let mut now_ms = 1_700_000_000_000u64;
    group.bench_function("check_message/6_limits", |b| {
        b.iter(|| {
            let mut admitted = 0u32;
            for i in 0..CHECKS {
                now_ms += 7;
                let key = &keys[(i % KEYS) as usize];
                let now = Timestamp::from_unix_ms(now_ms);
                admitted += u32::from(limiter.check_message(key, 3, now).is_ok());
            }
            black_box(admitted)
        })
    });
    group.bench_function("check_recipient/6_limits", |b| {
        b.iter(|| {
            let mut admitted = 0u32;
            let now = Timestamp::from_unix_ms(now_ms);
            for i in 0..CHECKS {
                let key = &keys[(i % KEYS) as usize];
                admitted += u32::from(limiter.check_recipient(key, 5, now).is_ok());
            }
            black_box(admitted)
        })
    });
    let user_keys: Vec<Key> = (0..KEYS)
        .map(|i| Key::user(&format!("user{i}@example.org")))
        .collect();
    let mut one_limit = Limiter::new(
        RateLimits {
            recipients_per_hour: Some(100_000),
            ..RateLimits::default()
        },
        DEFAULT_LIMITER_MAX_KEYS,
    )
    .unwrap_or_else(|error| panic!("benchmark limits refused: {error}"));
    group.bench_function("check_message/1_limit_user_key", |b| {
        b.iter(|| {
            let mut admitted = 0u32;
            for i in 0..CHECKS {
                now_ms += 7;
                let key = &user_keys[(i % KEYS) as usize];
                let now = Timestamp::from_unix_ms(now_ms);
                admitted += u32::from(one_limit.check_message(key, 3, now).is_ok());
            }
            black_box(admitted)
        })
    });
    // A full table: every check brings a new key and evicts the oldest.
    let mut small = Limiter::new(all_limits(), 1_000)
        .unwrap_or_else(|error| panic!("benchmark limits refused: {error}"));
    let mut next_key = 0u32;
    group.bench_function("check_message/evicting", |b| {
        b.iter(|| {
            let mut admitted = 0u32;
            for _ in 0..CHECKS {
                next_key = next_key.wrapping_add(1);
                now_ms += 7;
                let key = Key::ip(address(next_key & 0x00ff_ffff));
                let now = Timestamp::from_unix_ms(now_ms);
                admitted += u32::from(small.check_message(&key, 3, now).is_ok());
            }
            black_box(admitted)
        })
    });

    let mut guard = LoginGuard::new(LoginPolicy::default())
        .unwrap_or_else(|error| panic!("benchmark policy refused: {error}"));
    let users: Vec<String> = (0..KEYS).map(|i| format!("user{i}@example.org")).collect();
    group.bench_function("login/before_attempt_and_failure", |b| {
        b.iter(|| {
            let mut locked = 0u32;
            for i in 0..CHECKS {
                now_ms += 7;
                let now = Timestamp::from_unix_ms(now_ms);
                let user = Some(users[(i % KEYS) as usize].as_str());
                let who = address(i % KEYS);
                let decision = guard.before_attempt(who, user, now);
                locked += u32::from(matches!(decision, tsubame_policy::Decision::Locked { .. }));
                guard.after_failure(who, user, now);
            }
            black_box(locked)
        })
    });
    group.finish();
}

criterion_group!(benches, policy);
criterion_main!(benches);
