use std::path::Path;

use proptest::prelude::*;

use super::*;

const MINUTE_MS: u64 = 60 * 1_000;
const HOUR_MS: u64 = 60 * MINUTE_MS;
/// The start of a bucket, far from the epoch (2027).
const BASE_MS: u64 = BUCKET_MS * 2_000_000;
/// When something counted in the bucket starting at `BASE_MS` stops counting.
const BASE_LEAVES_MS: u64 = BASE_MS + 97 * BUCKET_MS;

fn key(account: &str) -> QuotaKey {
    QuotaKey::new("gmail", account)
}

fn limits(
    messages_per_day: Option<u32>,
    recipients_per_day: Option<u32>,
) -> impl Fn(&QuotaKey) -> Option<QuotaLimits> + Send + 'static {
    move |key: &QuotaKey| {
        (key.account() != "unlimited").then_some(QuotaLimits {
            messages_per_day,
            recipients_per_day,
            reserve_percent: 0,
        })
    }
}

fn quotas(messages_per_day: Option<u32>, recipients_per_day: Option<u32>) -> Quotas {
    Quotas::new(limits(messages_per_day, recipients_per_day))
}

fn usage(refusal: QuotaExhausted) -> Usage {
    match refusal.which {
        Exhausted::Messages(usage) | Exhausted::Recipients(usage) => usage,
        Exhausted::Blocked { .. } => panic!("blocked, not counted: {refusal:?}"),
    }
}

// ---- counting ----

#[test]
fn counts_up_to_the_limit_then_says_when_the_next_one_fits() {
    let mut q = quotas(Some(3), None);
    let k = key("a");
    for _ in 0..3 {
        q.check(&k, 1, BASE_MS).unwrap();
        q.record(&k, 1, BASE_MS);
    }
    let refused = q.check(&k, 1, BASE_MS + HOUR_MS).unwrap_err();
    assert_eq!(
        refused,
        QuotaExhausted {
            which: Exhausted::Messages(Usage {
                used: 3,
                limit: 3,
                allowed: 3
            }),
            until_unix_ms: Some(BASE_LEAVES_MS),
        }
    );
    assert!(q.check(&k, 1, BASE_LEAVES_MS - 1).is_err());
    q.check(&k, 1, BASE_LEAVES_MS).unwrap();
}

#[test]
fn what_was_sent_counts_at_least_a_day_and_at_most_a_bucket_more() {
    let cases = [
        // Sent at the very start of a bucket: counts a day and a whole bucket.
        (BASE_MS, WINDOW_MS + BUCKET_MS),
        // At its last millisecond: a day and one millisecond.
        (BASE_MS + BUCKET_MS - 1, WINDOW_MS + 1),
        (BASE_MS + 7 * MINUTE_MS, WINDOW_MS + 8 * MINUTE_MS),
    ];
    for (sent_ms, counted_ms) in cases {
        let mut q = quotas(Some(1), None);
        let k = key("a");
        q.record(&k, 1, sent_ms);
        assert!(
            q.check(&k, 1, sent_ms + counted_ms - 1).is_err(),
            "{sent_ms}"
        );
        q.check(&k, 1, sent_ms + counted_ms).unwrap();
        assert!(counted_ms > WINDOW_MS && counted_ms <= WINDOW_MS + BUCKET_MS);
    }
}

#[test]
fn recipients_count_what_was_accepted() {
    let mut q = quotas(None, Some(10));
    let k = key("a");
    q.record(&k, 6, BASE_MS);
    q.check(&k, 4, BASE_MS).unwrap();
    let refused = q.check(&k, 5, BASE_MS).unwrap_err();
    assert_eq!(
        refused.which,
        Exhausted::Recipients(Usage {
            used: 6,
            limit: 10,
            allowed: 10
        })
    );
    // Nothing accepted, nothing sent: not a message.
    q.record(&k, 0, BASE_MS);
    assert_eq!(q.status(BASE_MS)[0].messages_used, 1);
}

#[test]
fn the_reserve_is_kept_back_rounding_towards_refusal() {
    let cases: &[(u32, u8, u32)] = &[
        (10_000, 5, 9_500),
        (10_000, 0, 10_000),
        (2_000, 10, 1_800),
        (3, 20, 2),
        (1, 1, 0),
        (10, 100, 0),
        (10, 255, 0),
        (0, 0, 0),
        (u32::MAX, 0, u32::MAX),
        (u32::MAX, 50, u32::MAX / 2),
    ];
    for &(limit, reserve_percent, allowed) in cases {
        let limits = QuotaLimits {
            messages_per_day: Some(limit),
            recipients_per_day: None,
            reserve_percent,
        };
        assert_eq!(limits.allowed(limit), allowed, "{limit} {reserve_percent}%");
    }

    let mut q = Quotas::new(|_: &QuotaKey| {
        Some(QuotaLimits {
            messages_per_day: None,
            recipients_per_day: Some(10),
            reserve_percent: 20,
        })
    });
    let k = key("a");
    q.record(&k, 8, BASE_MS);
    let refused = q.check(&k, 1, BASE_MS).unwrap_err();
    let usage = usage(refused);
    assert_eq!((usage.used, usage.limit, usage.allowed), (8, 10, 8));
    // A refusal from the reserve alone: the transaction would fit the limit itself.
    assert!(usage.used < u64::from(usage.limit));
}

#[test]
fn a_transaction_larger_than_the_quota_never_fits_whole_and_headroom_says_how_to_split() {
    let mut q = quotas(Some(100), Some(10));
    let k = key("a");
    let refused = q.check(&k, 11, BASE_MS).unwrap_err();
    assert_eq!(refused.until_unix_ms, None);
    assert!(matches!(refused.which, Exhausted::Recipients(_)));
    assert_eq!(
        q.headroom(&k, BASE_MS),
        Headroom {
            messages: Some(100),
            recipients: Some(10)
        }
    );
    q.record(&k, 4, BASE_MS);
    assert_eq!(q.headroom(&k, BASE_MS).recipients, Some(6));
    q.check(&k, 6, BASE_MS).unwrap();
    // Even when the window is partly full, "never" outranks any wait.
    assert_eq!(q.check(&k, 11, BASE_MS).unwrap_err().until_unix_ms, None);
}

#[test]
fn the_binding_refusal_is_the_one_that_lasts_longest() {
    let mut q = quotas(Some(2), Some(5));
    let k = key("a");
    q.record(&k, 4, BASE_MS);
    q.record(&k, 1, BASE_MS + HOUR_MS);
    // Messages free one at BASE's bucket leaving; five recipients need both buckets gone.
    let refused = q.check(&k, 5, BASE_MS + 2 * HOUR_MS).unwrap_err();
    assert!(matches!(refused.which, Exhausted::Recipients(_)));
    assert_eq!(refused.until_unix_ms, Some(BASE_LEAVES_MS + HOUR_MS));
    let refused = q.check(&k, 1, BASE_MS + 2 * HOUR_MS).unwrap_err();
    assert!(matches!(refused.which, Exhausted::Messages(_)));
    assert_eq!(refused.until_unix_ms, Some(BASE_LEAVES_MS));
}

#[test]
fn a_limit_of_zero_refuses_everything_for_ever() {
    let q = quotas(Some(0), None);
    let refused = q.check(&key("a"), 1, BASE_MS).unwrap_err();
    assert_eq!(refused.until_unix_ms, None);
    assert_eq!(q.headroom(&key("a"), BASE_MS).recipients, Some(0));
}

#[test]
fn keys_without_limits_are_neither_counted_nor_refused() {
    let mut q = quotas(Some(1), Some(1));
    let k = key("unlimited");
    for _ in 0..10 {
        let reservation = q.begin(&k, 1_000, BASE_MS).unwrap();
        q.finish(reservation, 1_000, BASE_MS);
    }
    q.record(&k, 5, BASE_MS);
    assert_eq!(q.stats().tracked_accounts, 0);
    assert!(!q.is_dirty());
    assert_eq!(
        q.headroom(&k, BASE_MS),
        Headroom {
            messages: None,
            recipients: None
        }
    );
}

#[test]
fn a_clock_that_steps_back_counts_everything_for_at_least_a_day_from_the_step() {
    let mut q = quotas(Some(2), None);
    let k = key("a");
    q.record(&k, 1, BASE_MS + 10 * HOUR_MS);
    // The clock goes back ten hours: the later bucket still counts.
    assert!(q.check(&k, 2, BASE_MS).is_ok());
    q.record(&k, 1, BASE_MS);
    assert_eq!(q.status(BASE_MS)[0].messages_used, 2);
    assert!(q.check(&k, 1, BASE_MS).is_err());
    // Folded into the bucket of the step, both leave a day and a bucket after it.
    assert!(q.check(&k, 1, BASE_LEAVES_MS - 1).is_err());
    q.check(&k, 1, BASE_LEAVES_MS).unwrap();
    // Memory stays bounded whatever the clock does.
    for hour in (0..200).rev() {
        q.record(&k, 1, BASE_MS + hour * HOUR_MS);
        assert!(q.accounts[&k].buckets.len() <= BUCKETS_PER_ACCOUNT_MAX);
    }
}

#[test]
fn every_bucket_is_kept_only_while_it_counts() {
    let mut q = quotas(Some(u32::MAX), None);
    let k = key("a");
    for minute in 0..(3 * 24 * 60) {
        q.record(&k, 1, BASE_MS + minute * MINUTE_MS);
        assert!(q.accounts[&k].buckets.len() <= BUCKETS_PER_ACCOUNT_MAX);
    }
    // Every minute of the last day and the bucket before it.
    let now = BASE_MS + (3 * 24 * 60 - 1) * MINUTE_MS;
    assert_eq!(q.status(now)[0].messages_used, 24 * 60 + 15);
}

// ---- in flight ----

#[test]
fn reservations_count_until_finished() {
    let mut q = quotas(Some(2), Some(10));
    let k = key("a");
    let first = q.begin(&k, 4, BASE_MS).unwrap();
    let second = q.begin(&k, 4, BASE_MS).unwrap();
    assert_eq!(second.recipients(), 4);
    assert_eq!(second.key(), &k);
    let refused = q.begin(&k, 1, BASE_MS).unwrap_err();
    assert!(matches!(
        refused.which,
        Exhausted::Messages(Usage { used: 2, .. })
    ));
    // Only what is in flight stands in the way: it counts from now once accepted.
    assert_eq!(refused.until_unix_ms, Some(BASE_LEAVES_MS));
    assert_eq!(q.headroom(&k, BASE_MS).recipients, Some(0));

    q.finish(first, 0, BASE_MS + MINUTE_MS);
    let status = &q.status(BASE_MS + MINUTE_MS)[0];
    assert_eq!(
        (status.messages_in_flight, status.recipients_in_flight),
        (1, 4)
    );
    assert_eq!(status.messages_used, 0);
    let third = q.begin(&k, 6, BASE_MS + MINUTE_MS).unwrap();
    assert!(q.check(&k, 1, BASE_MS + MINUTE_MS).is_err());
    q.finish(second, 3, BASE_MS + MINUTE_MS);
    q.finish(third, 6, BASE_MS + MINUTE_MS);
    let status = &q.status(BASE_MS + MINUTE_MS)[0];
    assert_eq!(
        (
            status.messages_in_flight,
            status.recipients_in_flight,
            status.messages_used,
            status.recipients_used
        ),
        (0, 0, 2, 9)
    );
}

// ---- blocks ----

#[test]
fn a_block_refuses_until_its_time_and_is_never_shortened() {
    let mut q = quotas(Some(1_000), None);
    let k = key("a");
    q.block_until(&k, BASE_MS + HOUR_MS, BASE_MS);
    assert!(q.is_dirty());
    let refused = q.check(&k, 1, BASE_MS).unwrap_err();
    assert_eq!(
        refused,
        QuotaExhausted {
            which: Exhausted::Blocked {
                upstream_wide: false
            },
            until_unix_ms: Some(BASE_MS + HOUR_MS)
        }
    );
    assert_eq!(
        q.headroom(&k, BASE_MS),
        Headroom {
            messages: Some(0),
            recipients: Some(0)
        }
    );
    q.block_until(&k, BASE_MS + MINUTE_MS, BASE_MS);
    assert_eq!(
        q.status(BASE_MS)[0].blocked_until_unix_ms,
        Some(BASE_MS + HOUR_MS)
    );
    // At most a day.
    q.block_until(&k, u64::MAX, BASE_MS);
    assert_eq!(
        q.status(BASE_MS)[0].blocked_until_unix_ms,
        Some(BASE_MS + MAX_BLOCK_MS)
    );
    q.check(&k, 1, BASE_MS + MAX_BLOCK_MS).unwrap();
    // Another account is not blocked; an account without limits can be.
    q.check(&key("b"), 1, BASE_MS).unwrap();
    q.block_until(&key("unlimited"), BASE_MS + HOUR_MS, BASE_MS);
    assert!(q.check(&key("unlimited"), 1, BASE_MS).is_err());
    // A block in the past does nothing.
    q.block_until(&key("c"), BASE_MS, BASE_MS);
    assert_eq!(q.stats().tracked_accounts, 2);
}

#[test]
fn an_upstream_block_covers_every_account_of_that_upstream() {
    let mut q = quotas(None, None);
    q.block_upstream_until("gmail", BASE_MS + HOUR_MS, BASE_MS);
    let refused = q.check(&key("anyone"), 1, BASE_MS).unwrap_err();
    assert_eq!(
        refused.which,
        Exhausted::Blocked {
            upstream_wide: true
        }
    );
    q.check(&QuotaKey::new("relay-b", "anyone"), 1, BASE_MS)
        .unwrap();
    assert_eq!(
        q.upstream_blocks(BASE_MS),
        vec![("gmail".to_string(), BASE_MS + HOUR_MS)]
    );
    q.check(&key("anyone"), 1, BASE_MS + HOUR_MS).unwrap();
    assert!(q.upstream_blocks(BASE_MS + HOUR_MS).is_empty());
}

// ---- bounds ----

#[test]
fn key_parts_are_cut_at_a_character_boundary() {
    let long = format!("{}\u{3042}tail", "a".repeat(MAX_KEY_PART_BYTES - 1));
    let k = QuotaKey::new(&long, &long);
    assert_eq!(k.upstream(), "a".repeat(MAX_KEY_PART_BYTES - 1));
    assert_eq!(k.account(), k.upstream());
    assert_eq!(QuotaKey::new("u", "a").account(), "a");
}

#[test]
fn a_full_table_counts_no_new_account_until_one_is_idle() {
    let mut q = quotas(Some(10), None);
    for i in 0..MAX_TRACKED_ACCOUNTS {
        q.record(&key(&format!("a{i}")), 1, BASE_MS);
    }
    q.record(&key("late"), 1, BASE_MS);
    assert_eq!(
        q.stats(),
        QuotaStats {
            tracked_accounts: MAX_TRACKED_ACCOUNTS,
            untracked_records: 1
        }
    );
    q.check(&key("late"), 1, BASE_MS).unwrap();
    // A day later every account is idle and makes room.
    q.record(&key("late"), 1, BASE_LEAVES_MS);
    assert_eq!(q.stats().tracked_accounts, 1);
    assert_eq!(q.status(BASE_LEAVES_MS)[0].key, key("late"));
}

#[test]
fn status_lists_accounts_in_key_order() {
    let mut q = quotas(Some(5), Some(50));
    q.record(&key("b"), 3, BASE_MS);
    q.record(&key("a"), 7, BASE_MS);
    q.record(&key("a"), 1, BASE_MS + MINUTE_MS);
    let status = q.status(BASE_MS + MINUTE_MS);
    assert_eq!(status.len(), 2);
    assert_eq!(status[0].key, key("a"));
    assert_eq!((status[0].messages_used, status[0].recipients_used), (2, 8));
    assert_eq!(status[0].limits.unwrap().messages_per_day, Some(5));
    assert_eq!(status[0].next_message, Ok(()));
    assert_eq!(status[1].key, key("b"));
}

// ---- persistence ----

fn used(q: &Quotas, now: u64) -> Vec<(QuotaKey, u64, u64, Option<u64>)> {
    q.status(now)
        .into_iter()
        .map(|status| {
            (
                status.key,
                status.messages_used,
                status.recipients_used,
                status.blocked_until_unix_ms,
            )
        })
        .collect()
}

fn load(path: &Path, now: u64) -> (Quotas, LoadOutcome) {
    Quotas::load(path, limits(Some(100), Some(1_000)), now)
}

/// A quota file with some counts and blocks, saved at `BASE_MS + 2 h`.
fn saved_file(path: &Path) -> Quotas {
    let mut q = quotas(Some(100), Some(1_000));
    q.record(&key("a"), 3, BASE_MS);
    q.record(&key("a"), 5, BASE_MS + HOUR_MS);
    q.record(&key("b\"\\\u{3042}"), 1, BASE_MS + 2 * HOUR_MS);
    q.block_until(&key("c"), BASE_MS + 5 * HOUR_MS, BASE_MS);
    q.block_upstream_until("relay", BASE_MS + 3 * HOUR_MS, BASE_MS);
    q.save(path, BASE_MS + 2 * HOUR_MS).unwrap();
    q
}

#[test]
fn save_and_load_restore_the_counts_and_blocks() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join(FILE_NAME);
    let mut q = saved_file(&path);
    assert!(!q.is_dirty());
    let now = BASE_MS + 2 * HOUR_MS + MINUTE_MS;
    let (loaded, outcome) = load(&path, now);
    assert_eq!(outcome, LoadOutcome::Loaded { accounts: 3 });
    assert_eq!(used(&loaded, now), used(&q, now));
    assert_eq!(loaded.upstream_blocks(now), q.upstream_blocks(now));
    assert_eq!(loaded.upstream_blocks(now).len(), 1);
    assert!(!loaded.is_dirty());
    assert_eq!(
        loaded.check(&key("a"), 993, now).unwrap_err(),
        q.check(&key("a"), 993, now).unwrap_err()
    );
    q.record(&key("a"), 1, now);
    assert!(q.is_dirty());
    // The file is private, and no temporary file is left.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let names: Vec<_> = std::fs::read_dir(directory.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from(FILE_NAME)]);
}

#[test]
fn load_drops_what_left_the_window() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join(FILE_NAME);
    saved_file(&path);
    // A's first bucket has left; its second and b's are still in.
    let (loaded, _) = load(&path, BASE_LEAVES_MS);
    assert_eq!(
        used(&loaded, BASE_LEAVES_MS),
        vec![(key("a"), 1, 5, None), (key("b\"\\\u{3042}"), 1, 1, None)]
    );
    assert!(loaded.upstream_blocks(BASE_LEAVES_MS).is_empty());
    let (loaded, outcome) = load(&path, BASE_MS + 2 * WINDOW_MS);
    assert_eq!(outcome, LoadOutcome::Loaded { accounts: 0 });
    assert_eq!(loaded.stats().tracked_accounts, 0);
}

#[test]
fn a_missing_file_starts_empty() {
    let directory = tempfile::tempdir().unwrap();
    let (q, outcome) = load(&directory.path().join(FILE_NAME), BASE_MS);
    assert_eq!(outcome, LoadOutcome::Missing);
    assert_eq!(q.stats().tracked_accounts, 0);
    assert!(!q.is_dirty());
}

#[test]
fn an_unusable_file_starts_empty_with_a_reason_and_is_replaced_at_the_next_save() {
    let good = |body: &str| {
        format!(
            r#"{{"format":"tsubame-quotas","version":1,"saved_at_unix_ms":0,"bucket_ms":900000,{body}}}"#
        )
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", Vec::new(), "not a quota file"),
        ("garbage", vec![0x89, 0x00, 0xff, 0x13], "not a quota file"),
        ("text", b"hello\n".to_vec(), "not a quota file"),
        ("zeros", vec![0; 4096], "not a quota file"),
        (
            "another JSON",
            b"{\"accounts\":[]}".to_vec(),
            "not a quota file",
        ),
        (
            "another format",
            br#"{"format":"x","version":1}"#.to_vec(),
            "format",
        ),
        (
            "a later version",
            br#"{"format":"tsubame-quotas","version":2,"anything":[1]}"#.to_vec(),
            "version 2",
        ),
        ("no accounts", good(r#""x":1"#).into_bytes(), "damaged"),
        (
            "a negative count",
            good(r#""accounts":[{"upstream":"u","account":"a","buckets":[[0,-1,0]]}]"#)
                .into_bytes(),
            "damaged",
        ),
        (
            "a count above u32",
            good(r#""accounts":[{"upstream":"u","account":"a","buckets":[[0,4294967296,0]]}]"#)
                .into_bytes(),
            "damaged",
        ),
        (
            "a short bucket",
            good(r#""accounts":[{"upstream":"u","account":"a","buckets":[[0,1]]}]"#).into_bytes(),
            "damaged",
        ),
        (
            "bytes after the object",
            format!("{}\n{{}}", good(r#""accounts":[]"#)).into_bytes(),
            "not a quota file",
        ),
        (
            "a zero bucket length",
            good(r#""accounts":[]"#).replace("900000", "0").into_bytes(),
            "bucket length",
        ),
        (
            "invalid UTF-8 in a name",
            good(r#""accounts":[{"upstream":"u","account":"\u0001","buckets":[]}]"#)
                .replace("\\u0001", "\u{1}")
                .into_bytes()
                .into_iter()
                .map(|byte| if byte == 1 { 0xff } else { byte })
                .collect(),
            "",
        ),
    ];
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join(FILE_NAME);
    for (name, bytes, reason_part) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let (mut q, outcome) = load(&path, BASE_MS);
        match &outcome {
            LoadOutcome::Discarded { reason } => {
                assert!(reason.contains(reason_part), "{name}: {reason}")
            }
            other => panic!("{name}: {other:?}"),
        }
        assert_eq!(q.stats().tracked_accounts, 0, "{name}");
        assert!(q.is_dirty(), "{name}");
        q.save(&path, BASE_MS).unwrap();
        assert_eq!(
            load(&path, BASE_MS).1,
            LoadOutcome::Loaded { accounts: 0 },
            "{name}"
        );
    }
    // A good file with an empty account list loads.
    std::fs::write(&path, good(r#""accounts":[]"#)).unwrap();
    assert_eq!(load(&path, BASE_MS).1, LoadOutcome::Loaded { accounts: 0 });
}

#[test]
fn unreadable_or_oversized_files_are_discarded_not_fatal() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join(FILE_NAME);
    std::fs::create_dir(&path).unwrap();
    assert!(matches!(
        load(&path, BASE_MS).1,
        LoadOutcome::Discarded { reason } if reason.contains("cannot read")
    ));
    std::fs::remove_dir(&path).unwrap();
    // Sparse: no 64 MB is written.
    std::fs::File::create(&path)
        .unwrap()
        .set_len(MAX_FILE_BYTES + 1)
        .unwrap();
    assert!(matches!(
        load(&path, BASE_MS).1,
        LoadOutcome::Discarded { reason } if reason.contains("larger than")
    ));
}

/// Crash safety, second line: were a partly written file ever renamed into place (a
/// disk that ignores fsync), no truncation of it reads as valid counts.
#[test]
fn no_truncated_file_is_read_as_valid() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join(FILE_NAME);
    saved_file(&path);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.last(), Some(&b'\n'));
    let whole = decode(&bytes, BASE_MS + 2 * HOUR_MS).unwrap();
    for length in 0..bytes.len() {
        match decode(&bytes[..length], BASE_MS + 2 * HOUR_MS) {
            Err(_) => {}
            // Only the file without its final newline is complete.
            Ok(decoded) => {
                assert_eq!(length, bytes.len() - 1);
                assert_eq!(decoded.accounts, whole.accounts);
            }
        }
    }
    // The same bytes with the tail zeroed (a file extended but not written) are refused.
    let mut zeroed = bytes.clone();
    let half = zeroed.len() / 2;
    zeroed[half..].fill(0);
    assert!(decode(&zeroed, BASE_MS).is_err());
}

#[test]
fn a_leftover_temporary_file_is_ignored_and_replaced() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join(FILE_NAME);
    let temporary = directory.path().join(format!("{FILE_NAME}.tmp"));
    std::fs::write(&temporary, b"{\"format\":\"tsubame-quo").unwrap();
    assert_eq!(load(&path, BASE_MS).1, LoadOutcome::Missing);
    saved_file(&path);
    assert!(!temporary.exists());
    assert!(matches!(load(&path, BASE_MS).1, LoadOutcome::Loaded { .. }));
}

#[test]
fn a_failed_save_keeps_the_counts_dirty_and_the_old_file() {
    let directory = tempfile::tempdir().unwrap();
    let missing = directory.path().join("missing").join(FILE_NAME);
    let mut q = quotas(Some(10), None);
    q.record(&key("a"), 1, BASE_MS);
    let error = q.save(&missing, BASE_MS).unwrap_err();
    assert_eq!(error.step, "creating the temporary file");
    assert!(error.to_string().contains("missing"));
    assert!(q.is_dirty());

    // A snapshot written by someone else: the flag is the caller's to restore.
    let path = directory.path().join(FILE_NAME);
    let snapshot = q.snapshot(BASE_MS);
    assert!(!q.is_dirty());
    snapshot.write_atomically(&path).unwrap();
    q.mark_dirty();
    assert!(q.is_dirty());
    assert_eq!(load(&path, BASE_MS).1, LoadOutcome::Loaded { accounts: 1 });
}

#[test]
fn files_with_other_bucket_lengths_duplicates_and_future_buckets_load_conservatively() {
    let hour_bucket_start = BASE_MS;
    let file = format!(
        r#"{{"format":"tsubame-quotas","version":1,"saved_at_unix_ms":0,"bucket_ms":3600000,
        "upstream_blocks":[{{"upstream":"gmail","blocked_until_unix_ms":{block}}}],
        "accounts":[
        {{"upstream":"gmail","account":"a","buckets":[[{hour_bucket_start},2,20]]}},
        {{"upstream":"gmail","account":"a","buckets":[[{hour_bucket_start},1,10]],"blocked_until_unix_ms":{old_block}}},
        {{"upstream":"gmail","account":"future","buckets":[[{future},1,1]]}}
        ]}}"#,
        block = u64::MAX,
        old_block = BASE_MS - 1,
        future = BASE_MS + 100 * WINDOW_MS,
    );
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join(FILE_NAME);
    std::fs::write(&path, file).unwrap();
    let now = BASE_MS + HOUR_MS;
    let (q, outcome) = load(&path, now);
    assert_eq!(outcome, LoadOutcome::Loaded { accounts: 2 });
    assert_eq!(
        used(&q, now),
        vec![(key("a"), 3, 30, None), (key("future"), 1, 1, None)]
    );
    // The hour bucket counts from its last millisecond: a day and a bucket after that.
    let leaves = BASE_MS + HOUR_MS + WINDOW_MS;
    assert_eq!(used(&q, leaves - 1)[0].1, 3);
    assert_eq!(used(&q, leaves)[0], (key("a"), 0, 0, None));
    // The future bucket counts as now's, the block at most a day.
    assert_eq!(
        q.upstream_blocks(now),
        vec![("gmail".to_string(), now + MAX_BLOCK_MS)]
    );
    let future_status = &q.status(now + WINDOW_MS)[1];
    assert_eq!(future_status.messages_used, 1);
}

// ---- properties ----

/// Limits per account index: messages, recipients, or both; the last has none.
fn prop_limits(index: usize, reserve_percent: u8) -> Option<QuotaLimits> {
    let (messages_per_day, recipients_per_day) = match index {
        0 => (Some(5), None),
        1 => (None, Some(12)),
        2 => (Some(4), Some(9)),
        _ => return None,
    };
    Some(QuotaLimits {
        messages_per_day,
        recipients_per_day,
        reserve_percent,
    })
}

const PROP_ACCOUNTS: usize = 4;

fn prop_quotas(reserve_percent: u8) -> Quotas {
    Quotas::new(move |key: &QuotaKey| {
        let index: usize = key.account().parse().ok()?;
        prop_limits(index, reserve_percent)
    })
}

fn step() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0u64..5 * MINUTE_MS,
        3 => 0u64..3 * HOUR_MS,
        1 => 0u64..30 * HOUR_MS,
    ]
}

/// The exact model: what was accepted at each time, per account.
#[derive(Debug, Default, Clone)]
struct Model {
    sent: Vec<(u64, u32)>,
    in_flight_messages: u64,
    in_flight_recipients: u64,
}

impl Model {
    /// Messages and recipients sent within `length_ms` before `now` (exclusive).
    fn sum(&self, now: u64, length_ms: u64) -> (u64, u64) {
        self.sent
            .iter()
            .filter(|&&(at, _)| now < at + length_ms)
            .fold((0, 0), |(messages, recipients), &(_, r)| {
                (messages + 1, recipients + u64::from(r))
            })
    }
}

fn check_against_model(
    q: &Quotas,
    k: &QuotaKey,
    model: &Model,
    limits: Option<QuotaLimits>,
    recipients: u32,
    now: u64,
    result: Result<(), QuotaExhausted>,
) -> Result<(), TestCaseError> {
    let Some(limits) = limits else {
        prop_assert_eq!(result, Ok(()));
        return Ok(());
    };
    let exact = model.sum(now, WINDOW_MS);
    let stretched = model.sum(now, WINDOW_MS + BUCKET_MS);
    let counters = [
        (
            limits.messages_per_day,
            1u64,
            exact.0,
            stretched.0,
            model.in_flight_messages,
        ),
        (
            limits.recipients_per_day,
            u64::from(recipients),
            exact.1,
            stretched.1,
            model.in_flight_recipients,
        ),
    ];
    match result {
        Ok(()) => {
            // Never looser than the exact window.
            for (limit, amount, exact, _, in_flight) in counters {
                if let Some(limit) = limit {
                    prop_assert!(exact + in_flight + amount <= u64::from(limits.allowed(limit)));
                }
            }
        }
        Err(refusal) => {
            let (index, usage) = match refusal.which {
                Exhausted::Messages(usage) => (0, usage),
                Exhausted::Recipients(usage) => (1, usage),
                Exhausted::Blocked { .. } => {
                    return Err(TestCaseError::fail("no block was set"));
                }
            };
            let (_, amount, _, stretched, in_flight) = counters[index];
            // At most one bucket stricter than the exact window.
            prop_assert!(
                stretched + in_flight + amount > u64::from(usage.allowed),
                "refused with {} of {} used over a day and a bucket",
                stretched + in_flight,
                usage.allowed
            );
            match refusal.until_unix_ms {
                None => prop_assert!(amount > u64::from(usage.allowed)),
                Some(until) => {
                    prop_assert!(until > now);
                    prop_assert!(until <= now + WINDOW_MS + BUCKET_MS);
                    if model.in_flight_messages == 0 {
                        // The earliest time: it fits then and not a moment before.
                        prop_assert_eq!(q.check(k, recipients, until), Ok(()));
                        prop_assert!(q.check(k, recipients, until - 1).is_err());
                    }
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The counts lie between an exact rolling day and a day and a bucket; every
    /// admission is within the exact window, every refusal justified within one more
    /// bucket, and `until` is the earliest time the transaction fits. Snapshots decode to
    /// the same counts.
    #[test]
    fn counts_stay_within_one_bucket_of_the_exact_window(
        events in proptest::collection::vec((0..PROP_ACCOUNTS, 0u32..8, 0u8..5, step()), 1..300),
        reserve_percent in prop_oneof![Just(0u8), Just(25u8)],
    ) {
        let mut q = prop_quotas(reserve_percent);
        let keys: Vec<QuotaKey> = (0..PROP_ACCOUNTS).map(|i| key(&i.to_string())).collect();
        let mut models = vec![Model::default(); PROP_ACCOUNTS];
        let mut reservations: Vec<(usize, Reservation)> = Vec::new();
        let mut now = BASE_MS;
        for (index, recipients, operation, step_ms) in events {
            now += step_ms;
            let k = &keys[index];
            let limits = prop_limits(index, reserve_percent);
            match operation {
                // Check, and send what was admitted.
                0 => {
                    let result = q.check(k, recipients, now);
                    check_against_model(&q, k, &models[index], limits, recipients, now, result)?;
                    if result.is_ok() {
                        q.record(k, recipients, now);
                        if recipients > 0 && limits.is_some() {
                            models[index].sent.push((now, recipients));
                        }
                    }
                }
                // Sent without asking (another path): counted all the same.
                1 => {
                    q.record(k, recipients, now);
                    if recipients > 0 && limits.is_some() {
                        models[index].sent.push((now, recipients));
                    }
                }
                // Begin a job.
                2 => {
                    let result = q.begin(k, recipients, now);
                    let plain = result.as_ref().map(|_| ()).map_err(|refusal| *refusal);
                    check_against_model(&q, k, &models[index], limits, recipients, now, plain)?;
                    if let Ok(reservation) = result {
                        if limits.is_some() {
                            models[index].in_flight_messages += 1;
                            models[index].in_flight_recipients += u64::from(recipients);
                        }
                        reservations.push((index, reservation));
                    }
                }
                // Finish the oldest job, the upstream accepting some of its recipients.
                3 => {
                    if !reservations.is_empty() {
                        let (index, reservation) = reservations.remove(0);
                        let accepted = recipients.min(reservation.recipients());
                        let model = &mut models[index];
                        if prop_limits(index, reserve_percent).is_some() {
                            model.in_flight_messages -= 1;
                            model.in_flight_recipients -= u64::from(reservation.recipients());
                            if accepted > 0 {
                                model.sent.push((now, accepted));
                            }
                        }
                        q.finish(reservation, accepted, now);
                    }
                }
                // Save and restore: the same counts come back.
                _ => {
                    let before = used(&q, now);
                    let bytes = q.snapshot(now).to_bytes().unwrap();
                    let decoded = decode(&bytes, now).map_err(TestCaseError::fail)?;
                    let mut restored = prop_quotas(reserve_percent);
                    restored.accounts = decoded.accounts;
                    // Only accounts with something counted are compared: in-flight
                    // counts are not saved.
                    let counted = |list: Vec<(QuotaKey, u64, u64, Option<u64>)>| -> Vec<_> {
                        list.into_iter().filter(|(_, m, ..)| *m > 0).collect()
                    };
                    prop_assert_eq!(counted(used(&restored, now)), counted(before));
                }
            }
            for (i, k) in keys.iter().enumerate() {
                let exact = models[i].sum(now, WINDOW_MS);
                let stretched = models[i].sum(now, WINDOW_MS + BUCKET_MS);
                let status = q.status(now);
                let (messages, recipients) = status
                    .iter()
                    .find(|status| &status.key == k)
                    .map_or((0, 0), |status| (status.messages_used, status.recipients_used));
                prop_assert!(exact.0 <= messages && messages <= stretched.0,
                    "messages {} not within [{}, {}]", messages, exact.0, stretched.0);
                prop_assert!(exact.1 <= recipients && recipients <= stretched.1,
                    "recipients {} not within [{}, {}]", recipients, exact.1, stretched.1);
                if let Some(account) = q.accounts.get(k) {
                    prop_assert!(account.buckets.len() <= BUCKETS_PER_ACCOUNT_MAX);
                }
            }
        }
    }

    /// A sender that always asks first never gets more than the quota past any exact
    /// rolling day.
    #[test]
    fn checked_sending_never_exceeds_the_quota_in_any_day(
        events in proptest::collection::vec((0u32..8, step()), 1..400),
        reserve_percent in prop_oneof![Just(0u8), Just(25u8)],
    ) {
        let mut q = prop_quotas(reserve_percent);
        let k = key("2");
        let limits = prop_limits(2, reserve_percent).unwrap();
        let mut sent: Vec<(u64, u32)> = Vec::new();
        let mut now = BASE_MS;
        for (recipients, step_ms) in events {
            now += step_ms;
            if q.check(&k, recipients, now).is_ok() && recipients > 0 {
                q.record(&k, recipients, now);
                sent.push((now, recipients));
            }
        }
        for (i, &(start, _)) in sent.iter().enumerate() {
            let day: Vec<_> = sent[i..].iter().take_while(|&&(at, _)| at < start + WINDOW_MS).collect();
            let recipients: u64 = day.iter().map(|&&(_, r)| u64::from(r)).sum();
            prop_assert!(day.len() as u64 <= u64::from(limits.allowed(4)));
            prop_assert!(recipients <= u64::from(limits.allowed(9)));
        }
    }
}

// ---- the shared book ----

#[test]
fn a_reservation_dropped_by_a_panicking_delivery_is_given_back() {
    // A worker's delivery that panics between `begin` and `finish` (the worker catches
    // it and defers the job) must not leave the job in flight until the process ends:
    // with a quota of one message, the account would send nothing more.
    let book = QuotaBook::new(
        quotas(Some(1), None),
        std::env::temp_dir().join("tsubame-quota-book-never-saved.json"),
    );
    let k = key("a");
    let delivery = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _in_flight = book.begin(&k, 1, BASE_MS).unwrap();
        panic!("a bug in the delivery");
    }));
    assert!(delivery.is_err());
    assert!(
        book.begin(&k, 1, BASE_MS).is_ok(),
        "the panicked job is no longer in flight"
    );
}
