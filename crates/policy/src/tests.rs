use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use proptest::prelude::*;

use super::*;

const SECOND_MS: u64 = 1_000;
const MINUTE_MS: u64 = 60 * SECOND_MS;
/// A multiple of every slot length (3 s, 3 min, 72 min), far from the epoch.
const BASE_MS: u64 = 4_320_000 * 400_000;

fn at(offset_ms: u64) -> Timestamp {
    Timestamp::from_unix_ms(BASE_MS + offset_ms)
}

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
}

fn user(name: &str) -> Key {
    Key::user(name)
}

fn limiter(limits: RateLimits) -> Limiter {
    Limiter::new(limits, DEFAULT_LIMITER_MAX_KEYS).unwrap()
}

// ---- keys ----

#[test]
fn keys_are_normalised() {
    let v6 = |s: &str| IpAddr::V6(s.parse::<Ipv6Addr>().unwrap());
    let cases: &[(Key, Key, bool)] = &[
        (
            Key::ip(v6("2001:db8:1:2::1")),
            Key::ip(v6("2001:db8:1:2:ffff::9")),
            true,
        ),
        (
            Key::ip(v6("2001:db8:1:2::1")),
            Key::ip(v6("2001:db8:1:3::1")),
            false,
        ),
        (Key::ip(v6("::ffff:192.0.2.7")), Key::ip(ip(7)), true),
        (Key::ip(ip(7)), Key::ip(ip(8)), false),
        (user("Alice@Example.org"), user("alice@example.org"), true),
        (user("alice"), user("bob"), false),
        (Key::ip(ip(1)), user("192.0.2.1"), false),
        (
            user(&"x".repeat(300)),
            user(&"x".repeat(MAX_USER_NAME_BYTES)),
            true,
        ),
        (user(&"x".repeat(255)), user(&"x".repeat(256)), false),
    ];
    for (i, (a, b, same)) in cases.iter().enumerate() {
        assert_eq!(a == b, *same, "case {i}");
    }
}

#[test]
fn long_multibyte_user_names_are_cut_at_a_character_boundary() {
    // 255 ASCII bytes then a 3-byte character straddling the limit.
    let name = format!("{}\u{3042}tail", "a".repeat(255));
    assert_eq!(user(&name), user(&"a".repeat(255)));
}

// ---- rate limits ----

#[test]
fn refused_until_the_window_has_passed_and_retry_after_says_when() {
    let mut l = limiter(RateLimits {
        messages_per_minute: Some(3),
        ..RateLimits::default()
    });
    let k = user("alice");
    for _ in 0..3 {
        l.check_message(&k, 1, at(0)).unwrap();
    }
    let refused = l.check_message(&k, 1, at(0)).unwrap_err();
    assert_eq!(
        refused,
        Exceeded {
            window: Window::Minute,
            counter: Counter::Messages,
            limit: 3,
            // The ring spans 21 slots of 3 s: the messages of slot 0 leave at 63 s.
            retry_after_secs: Some(63),
        }
    );
    assert!(l.check_message(&k, 1, at(62_999)).is_err());
    l.check_message(&k, 1, at(63_000)).unwrap();
    l.check_invariants().unwrap();
}

#[test]
fn a_refused_message_is_not_counted() {
    let mut l = limiter(RateLimits {
        recipients_per_minute: Some(10),
        ..RateLimits::default()
    });
    let k = user("alice");
    l.check_message(&k, 6, at(0)).unwrap();
    for _ in 0..100 {
        assert!(l.check_message(&k, 5, at(1_000)).is_err());
    }
    l.check_message(&k, 4, at(1_000)).unwrap();
    assert!(l.check_message(&k, 1, at(1_000)).is_err());
}

#[test]
fn slots_leave_one_at_a_time() {
    let mut l = limiter(RateLimits {
        messages_per_minute: Some(2),
        ..RateLimits::default()
    });
    let k = user("alice");
    l.check_message(&k, 1, at(0)).unwrap();
    l.check_message(&k, 1, at(30_000)).unwrap();
    // The slot of 0 s leaves at 63 s, the slot of 30 s at 93 s.
    let refused = l.check_message(&k, 1, at(40_000)).unwrap_err();
    assert_eq!(refused.retry_after_secs, Some(23));
    l.check_message(&k, 1, at(63_000)).unwrap();
    let refused = l.check_message(&k, 1, at(63_000)).unwrap_err();
    assert_eq!(refused.retry_after_secs, Some(30));
}

#[test]
fn too_many_recipients_for_any_window_can_never_pass() {
    let mut l = limiter(RateLimits {
        recipients_per_hour: Some(10),
        ..RateLimits::default()
    });
    let refused = l.check_message(&user("a"), 11, at(0)).unwrap_err();
    assert_eq!(refused.retry_after_secs, None);
    assert_eq!(refused.counter, Counter::Recipients);
    l.check_message(&user("a"), 10, at(0)).unwrap();
}

#[test]
fn the_binding_limit_is_the_one_with_the_longest_wait() {
    let mut l = limiter(RateLimits {
        messages_per_minute: Some(1),
        messages_per_hour: Some(1),
        ..RateLimits::default()
    });
    let k = user("a");
    l.check_message(&k, 1, at(0)).unwrap();
    let refused = l.check_message(&k, 1, at(0)).unwrap_err();
    assert_eq!(refused.window, Window::Hour);
    // 21 slots of 3 minutes.
    assert_eq!(refused.retry_after_secs, Some(63 * 60));
    // Past the minute the hour still refuses.
    let refused = l.check_message(&k, 1, at(2 * MINUTE_MS)).unwrap_err();
    assert_eq!(refused.window, Window::Hour);
}

#[test]
fn check_recipient_counts_nothing_and_tracks_no_key() {
    let mut l = limiter(RateLimits {
        messages_per_hour: Some(1),
        recipients_per_minute: Some(3),
        ..RateLimits::default()
    });
    let k = user("a");
    for recipients in 1..=3 {
        l.check_recipient(&k, recipients, at(0)).unwrap();
    }
    assert!(l.check_recipient(&k, 4, at(0)).is_err());
    assert_eq!(l.stats().tracked_keys, 0);
    l.check_message(&k, 3, at(0)).unwrap();
    // The message limit is spent too: the next transaction is refused at its first RCPT.
    let refused = l.check_recipient(&k, 1, at(0)).unwrap_err();
    assert_eq!(
        (refused.window, refused.counter),
        (Window::Hour, Counter::Messages)
    );
}

#[test]
fn no_limits_admit_everything_without_tracking() {
    let mut l = limiter(RateLimits::default());
    for i in 0..1_000u32 {
        l.check_message(&Key::ip(ip((i % 256) as u8)), u32::MAX, at(0))
            .unwrap();
    }
    assert_eq!(l.stats().tracked_keys, 0);
}

#[test]
fn a_clock_that_steps_back_counts_into_the_latest_time() {
    let mut l = limiter(RateLimits {
        messages_per_minute: Some(2),
        ..RateLimits::default()
    });
    let k = user("a");
    l.check_message(&k, 1, at(10 * MINUTE_MS)).unwrap();
    l.check_message(&k, 1, at(0)).unwrap();
    assert!(l.check_message(&k, 1, at(5 * MINUTE_MS)).is_err());
    l.check_message(&k, 1, at(12 * MINUTE_MS)).unwrap();
    l.check_invariants().unwrap();
}

#[test]
fn near_the_epoch_the_retry_time_is_still_right() {
    let mut l = limiter(RateLimits {
        messages_per_minute: Some(1),
        ..RateLimits::default()
    });
    let k = user("a");
    l.check_message(&k, 1, Timestamp::from_unix_ms(0)).unwrap();
    let refused = l
        .check_message(&k, 1, Timestamp::from_unix_ms(1_000))
        .unwrap_err();
    assert_eq!(refused.retry_after_secs, Some(62));
    l.check_message(&k, 1, Timestamp::from_unix_ms(63_000))
        .unwrap();
}

#[test]
fn invalid_rate_limits_are_refused() {
    let zero = RateLimits {
        recipients_per_day: Some(0),
        ..RateLimits::default()
    };
    assert!(matches!(
        Limiter::new(zero, 10),
        Err(Error::InvalidRateLimits(_))
    ));
    for keys in [0, MAX_TRACKED_KEYS + 1] {
        assert!(Limiter::new(RateLimits::default(), keys).is_err(), "{keys}");
    }
}

#[test]
fn a_full_limiter_evicts_the_least_recently_used_key() {
    let mut l = Limiter::new(
        RateLimits {
            messages_per_hour: Some(1),
            ..RateLimits::default()
        },
        3,
    )
    .unwrap();
    for name in ["a", "b", "c"] {
        l.check_message(&user(name), 1, at(0)).unwrap();
    }
    // "a" is used again (refused, but that is activity), so "b" is the oldest.
    assert!(l.check_message(&user("a"), 1, at(1)).is_err());
    l.check_message(&user("d"), 1, at(2)).unwrap();
    assert_eq!(
        l.stats(),
        LimiterStats {
            tracked_keys: 3,
            evictions: 1
        }
    );
    // "b" was forgotten and starts afresh; "a" and "c" were kept.
    l.check_message(&user("b"), 1, at(3)).unwrap();
    assert!(l.check_message(&user("a"), 1, at(4)).is_err());
    l.check_invariants().unwrap();
}

#[test]
fn many_keys_never_grow_the_table_past_its_bound() {
    let mut l = Limiter::new(
        RateLimits {
            messages_per_minute: Some(5),
            recipients_per_day: Some(100),
            ..RateLimits::default()
        },
        1_000,
    )
    .unwrap();
    for i in 0..50_000u32 {
        let key = Key::ip(IpAddr::V4(Ipv4Addr::from(i)));
        l.check_message(&key, 3, at(u64::from(i))).unwrap();
        assert!(l.stats().tracked_keys <= 1_000);
    }
    assert_eq!(l.stats().evictions, 49_000);
    l.check_invariants().unwrap();
}

#[test]
fn purge_idle_forgets_only_empty_keys() {
    let mut l = limiter(RateLimits {
        messages_per_minute: Some(5),
        ..RateLimits::default()
    });
    l.check_message(&user("old"), 1, at(0)).unwrap();
    l.check_message(&user("new"), 1, at(50_000)).unwrap();
    assert_eq!(l.purge_idle(at(60_000), 10), 0);
    assert_eq!(l.purge_idle(at(63_000), 10), 1);
    assert_eq!(l.stats().tracked_keys, 1);
    assert_eq!(l.purge_idle(at(200_000), 10), 1);
    l.check_invariants().unwrap();
}

// ---- logins ----

fn guard(policy: LoginPolicy) -> LoginGuard {
    LoginGuard::new(policy).unwrap()
}

#[test]
fn delays_start_after_n_failures_double_and_are_capped() {
    let mut g = guard(LoginPolicy::default());
    // failures so far -> decision before the next attempt
    let expected: &[(u32, Decision)] = &[
        (1, Decision::Allow),
        (4, Decision::Allow),
        (5, Decision::Delay(Duration::from_secs(1))),
        (6, Decision::Delay(Duration::from_secs(2))),
        (7, Decision::Delay(Duration::from_secs(4))),
        (10, Decision::Delay(Duration::from_secs(32))),
        (11, Decision::Delay(Duration::from_secs(60))),
        (19, Decision::Delay(Duration::from_secs(60))),
    ];
    let mut failures = 0;
    for &(after, decision) in expected {
        while failures < after {
            g.after_failure(ip(1), Some("alice"), at(0));
            failures += 1;
        }
        assert_eq!(
            g.before_attempt(ip(1), Some("alice"), at(0)),
            decision,
            "{after}"
        );
        // Both keys carry the count.
        assert_eq!(g.before_attempt(ip(9), Some("alice"), at(0)), decision);
        assert_eq!(g.before_attempt(ip(1), Some("bob"), at(0)), decision);
        assert_eq!(g.before_attempt(ip(1), None, at(0)), decision);
    }
    g.check_invariants().unwrap();
}

#[test]
fn a_delay_too_large_to_compute_is_the_cap() {
    let mut g = guard(LoginPolicy {
        delay_after_failures: 1,
        lockout_after_failures: u32::MAX,
        ..LoginPolicy::default()
    });
    for _ in 0..200 {
        g.after_failure(ip(1), None, at(0));
    }
    assert_eq!(
        g.before_attempt(ip(1), None, at(0)),
        Decision::Delay(Duration::from_millis(DEFAULT_MAX_DELAY_MS))
    );
}

#[test]
fn m_failures_lock_out_until_the_lockout_expires() {
    let mut g = guard(LoginPolicy::default());
    for i in 0..19 {
        g.after_failure(ip(1), Some("alice"), at(i * SECOND_MS));
    }
    let until = at(19 * SECOND_MS + 15 * MINUTE_MS);
    assert_eq!(
        g.after_failure(ip(1), Some("alice"), at(19 * SECOND_MS)),
        Decision::Locked { until }
    );
    // Any address for that user, any user from that address.
    for (address, name) in [
        (ip(1), Some("alice")),
        (ip(2), Some("ALICE")),
        (ip(1), None),
    ] {
        assert_eq!(
            g.before_attempt(address, name, at(20 * SECOND_MS)),
            Decision::Locked { until }
        );
    }
    // Over at `until`; the key stays suspect: longest delay, and one more failure locks
    // it again.
    assert_eq!(
        g.before_attempt(ip(1), Some("alice"), until),
        Decision::Delay(Duration::from_secs(60))
    );
    assert!(matches!(
        g.after_failure(ip(1), Some("alice"), until),
        Decision::Locked { .. }
    ));
    // A whole quiet window after the second lockout, everything is forgotten.
    let later = until.plus_ms(30 * MINUTE_MS + 1);
    assert_eq!(
        g.before_attempt(ip(1), Some("alice"), later),
        Decision::Allow
    );
    assert_eq!(
        g.after_failure(ip(1), Some("alice"), later),
        Decision::Allow
    );
    g.check_invariants().unwrap();
}

#[test]
fn failures_are_forgotten_after_a_quiet_window_only() {
    let mut g = guard(LoginPolicy::default());
    // One failure every 14 minutes never leaves a 15-minute gap: the count keeps growing.
    for i in 0..5 {
        g.after_failure(ip(1), None, at(i * 14 * MINUTE_MS));
    }
    assert_eq!(
        g.before_attempt(ip(1), None, at(4 * 14 * MINUTE_MS)),
        Decision::Delay(Duration::from_secs(1))
    );
    let last = 4 * 14 * MINUTE_MS;
    assert_ne!(
        g.before_attempt(ip(1), None, at(last + 15 * MINUTE_MS)),
        Decision::Allow
    );
    assert_eq!(
        g.before_attempt(ip(1), None, at(last + 15 * MINUTE_MS + 1)),
        Decision::Allow
    );
}

#[test]
fn success_forgets_the_user_but_not_the_address() {
    let mut g = guard(LoginPolicy::default());
    for _ in 0..6 {
        g.after_failure(ip(1), Some("alice"), at(0));
    }
    g.after_success(ip(1), "Alice", at(1));
    assert_eq!(
        g.before_attempt(ip(2), Some("alice"), at(2)),
        Decision::Allow
    );
    assert_eq!(
        g.before_attempt(ip(1), Some("alice"), at(2)),
        Decision::Delay(Duration::from_secs(2))
    );
    assert_eq!(g.stats().tracked_users, 0);
}

#[test]
fn spraying_many_users_from_one_address_is_caught_by_the_address() {
    let mut g = guard(LoginPolicy::default());
    for i in 0..20 {
        g.after_failure(ip(1), Some(&format!("user{i}")), at(0));
    }
    assert!(matches!(
        g.before_attempt(ip(1), Some("fresh"), at(0)),
        Decision::Locked { .. }
    ));
    assert_eq!(
        g.before_attempt(ip(2), Some("fresh"), at(0)),
        Decision::Allow
    );
}

#[test]
fn many_addresses_guessing_one_user_are_caught_by_the_user() {
    let mut g = guard(LoginPolicy::default());
    for i in 0..20 {
        g.after_failure(ip(i), Some("alice"), at(0));
    }
    assert!(matches!(
        g.before_attempt(ip(200), Some("alice"), at(0)),
        Decision::Locked { .. }
    ));
    assert_eq!(
        g.before_attempt(ip(200), Some("bob"), at(0)),
        Decision::Allow
    );
}

#[test]
fn full_login_tables_evict_and_stay_bounded() {
    let mut g = guard(LoginPolicy {
        max_tracked_addresses: 10,
        max_tracked_users: 5,
        ..LoginPolicy::default()
    });
    for i in 0..10_000u32 {
        let address = IpAddr::V4(Ipv4Addr::from(i));
        g.after_failure(address, Some(&format!("user{i}")), at(u64::from(i)));
        let stats = g.stats();
        assert!(stats.tracked_addresses <= 10 && stats.tracked_users <= 5);
    }
    assert_eq!(g.stats().evictions, (10_000 - 10) + (10_000 - 5));
    // The most recent keys are still tracked.
    g.after_failure(IpAddr::V4(Ipv4Addr::from(9_999u32)), None, at(10_000));
    g.check_invariants().unwrap();
}

#[test]
fn before_attempt_tracks_nothing_and_purge_forgets_quiet_keys() {
    let mut g = guard(LoginPolicy::default());
    for i in 0..100 {
        assert_eq!(g.before_attempt(ip(i), Some("x"), at(0)), Decision::Allow);
    }
    assert_eq!(g.stats().tracked_addresses, 0);
    g.after_failure(ip(1), Some("a"), at(0));
    g.after_failure(ip(2), Some("b"), at(10 * MINUTE_MS));
    assert_eq!(g.purge_idle(at(15 * MINUTE_MS + 1), 100), 2);
    assert_eq!(g.stats().tracked_addresses + g.stats().tracked_users, 2);
    g.check_invariants().unwrap();
}

#[test]
fn invalid_login_policies_are_refused() {
    let base = LoginPolicy::default();
    let cases = [
        LoginPolicy {
            delay_after_failures: 0,
            ..base
        },
        LoginPolicy {
            lockout_after_failures: 0,
            ..base
        },
        LoginPolicy {
            initial_delay_ms: 0,
            ..base
        },
        LoginPolicy {
            initial_delay_ms: 70_000,
            ..base
        },
        LoginPolicy {
            max_delay_ms: MAX_LOGIN_DELAY_MS + 1,
            initial_delay_ms: 1,
            ..base
        },
        LoginPolicy {
            lockout_secs: 0,
            ..base
        },
        LoginPolicy {
            lockout_secs: MAX_LOCKOUT_SECS + 1,
            ..base
        },
        LoginPolicy {
            failure_window_secs: 0,
            ..base
        },
        LoginPolicy {
            max_tracked_users: 0,
            ..base
        },
        LoginPolicy {
            max_tracked_addresses: MAX_TRACKED_KEYS + 1,
            ..base
        },
    ];
    for (i, policy) in cases.into_iter().enumerate() {
        assert!(
            matches!(LoginGuard::new(policy), Err(Error::InvalidLoginPolicy(_))),
            "case {i}"
        );
    }
}

// ---- properties ----

const KEYS: usize = 4;

fn prop_limits() -> RateLimits {
    RateLimits {
        messages_per_minute: Some(5),
        messages_per_hour: Some(30),
        messages_per_day: Some(100),
        recipients_per_minute: Some(12),
        recipients_per_hour: Some(60),
        recipients_per_day: None,
    }
}

fn rules() -> Vec<(Window, Counter, u32)> {
    let l = prop_limits();
    [
        (Window::Minute, Counter::Messages, l.messages_per_minute),
        (Window::Hour, Counter::Messages, l.messages_per_hour),
        (Window::Day, Counter::Messages, l.messages_per_day),
        (Window::Minute, Counter::Recipients, l.recipients_per_minute),
        (Window::Hour, Counter::Recipients, l.recipients_per_hour),
        (Window::Day, Counter::Recipients, l.recipients_per_day),
    ]
    .into_iter()
    .filter_map(|(w, c, limit)| limit.map(|limit| (w, c, limit)))
    .collect()
}

fn amount(counter: Counter, recipients: u32) -> u64 {
    match counter {
        Counter::Messages => 1,
        Counter::Recipients => u64::from(recipients),
    }
}

/// (key, recipients, milliseconds since the previous event)
fn event() -> impl Strategy<Value = (usize, u32, u64)> {
    (
        0..KEYS,
        0u32..8,
        prop_oneof![
            6 => 0u64..4_000,
            3 => 0u64..120_000,
            1 => 0u64..4 * 60 * MINUTE_MS,
        ],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Exactness: no interval of a window's length ever holds more than the limit, and
    /// every refusal is justified within the documented 5% stretch of the window.
    #[test]
    fn limits_hold_over_every_window(events in proptest::collection::vec(event(), 1..400)) {
        let mut l = Limiter::new(prop_limits(), KEYS).unwrap();
        let keys: Vec<Key> = (0..KEYS).map(|i| user(&format!("k{i}"))).collect();
        let mut admitted: Vec<Vec<(u64, u32)>> = vec![Vec::new(); KEYS];
        let mut now = BASE_MS;
        for (k, recipients, step_ms) in events {
            now += step_ms;
            let t = Timestamp::from_unix_ms(now);
            let pure = l.check_recipient(&keys[k], recipients, t);
            let result = l.check_message(&keys[k], recipients, t);
            prop_assert_eq!(pure, result, "check_recipient disagrees with check_message");
            match result {
                Ok(()) => admitted[k].push((now, recipients)),
                Err(e) => {
                    let window_ms = e.window.length_ms();
                    let stretch_ms = window_ms + window_ms / 20;
                    let used: u64 = admitted[k].iter()
                        .filter(|&&(t, _)| t + stretch_ms > now)
                        .map(|&(_, r)| amount(e.counter, r))
                        .sum();
                    prop_assert!(used + amount(e.counter, recipients) > u64::from(e.limit),
                        "refused with only {} used of {} in {:?}", used, e.limit, e.window);
                    match e.retry_after_secs {
                        None => prop_assert!(amount(e.counter, recipients) > u64::from(e.limit)),
                        Some(secs) => {
                            let later = Timestamp::from_unix_ms(now + u64::from(secs) * 1_000);
                            prop_assert_eq!(l.check_recipient(&keys[k], recipients, later), Ok(()));
                            if secs > 1 {
                                let earlier = Timestamp::from_unix_ms(now + u64::from(secs - 1) * 1_000 - 1);
                                prop_assert!(l.check_recipient(&keys[k], recipients, earlier).is_err(),
                                    "retry_after {} is not the earliest", secs);
                            }
                        }
                    }
                }
            }
            prop_assert!(l.stats().tracked_keys <= KEYS);
            l.check_invariants().map_err(TestCaseError::fail)?;
        }
        for (window, counter, limit) in rules() {
            for events in &admitted {
                for (i, &(start, _)) in events.iter().enumerate() {
                    let total: u64 = events[i..].iter()
                        .take_while(|&&(t, _)| t <= start + window.length_ms())
                        .map(|&(_, r)| amount(counter, r))
                        .sum();
                    prop_assert!(total <= u64::from(limit),
                        "{} {:?} {:?} within one window, limit {}", total, counter, window, limit);
                }
            }
        }
    }

    /// With more keys than room: never above the cap, never a panic, invariants hold.
    #[test]
    fn a_small_limiter_stays_bounded(
        events in proptest::collection::vec(event(), 1..300),
        cap in 1usize..4,
    ) {
        let mut l = Limiter::new(prop_limits(), cap).unwrap();
        let mut now = BASE_MS;
        for (k, recipients, step_ms) in events {
            now += step_ms;
            let t = Timestamp::from_unix_ms(now);
            let _ = l.check_message(&Key::ip(ip(k as u8)), recipients, t);
            if k == 0 {
                l.purge_idle(t, 2);
            }
            prop_assert!(l.stats().tracked_keys <= cap);
            l.check_invariants().map_err(TestCaseError::fail)?;
        }
    }

    /// Logins: bounded tables, delays within the cap, lockouts in the future, and the
    /// invariants (every key at M failures has a lockout) after every event.
    #[test]
    fn login_guard_stays_bounded_and_consistent(
        events in proptest::collection::vec((0u8..6, 0u8..6, 0u8..4, 0u64..120_000), 1..400),
        addresses_cap in 1usize..8,
        users_cap in 1usize..8,
    ) {
        let policy = LoginPolicy {
            max_tracked_addresses: addresses_cap,
            max_tracked_users: users_cap,
            ..LoginPolicy::default()
        };
        let mut g = LoginGuard::new(policy).unwrap();
        let mut now = BASE_MS;
        for (address, name, action, step_ms) in events {
            now += step_ms;
            let t = Timestamp::from_unix_ms(now);
            let name = format!("u{name}");
            let decision = g.before_attempt(ip(address), Some(&name), t);
            match decision {
                Decision::Allow => {}
                Decision::Delay(d) => prop_assert!(d <= Duration::from_millis(policy.max_delay_ms)),
                Decision::Locked { until } => prop_assert!(until > t),
            }
            match action {
                0 | 1 => { g.after_failure(ip(address), Some(&name), t); }
                2 => g.after_success(ip(address), &name, t),
                _ => { g.purge_idle(t, 3); }
            }
            let stats = g.stats();
            prop_assert!(stats.tracked_addresses <= addresses_cap && stats.tracked_users <= users_cap);
            g.check_invariants().map_err(TestCaseError::fail)?;
        }
    }
}
