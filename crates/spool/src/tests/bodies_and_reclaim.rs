//! Tests of `Spool::body` (zero-copy bodies) and `Spool::reclaim`, on real files.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::mpsc;

use super::*;

/// Appends a message-done record for `id` through the crate-internal call, which also
/// says where the record went.
fn append_done(spool: &Spool, id: MessageId) -> (RecordLocation, u64) {
    let payload =
        format::encode_message_done(id, 1_700_000_001_000, DoneReason::AllRecipientsFinal);
    spool
        .inner
        .shared
        .append_journal_record(RecordType::MessageDone, id, &payload)
        .unwrap()
}

fn append_deferred(spool: &Spool, id: MessageId) -> (RecordLocation, u64) {
    let payload = format::encode_recipient_outcome(
        id,
        0,
        OutcomeKind::Deferred,
        1_700_000_000_900,
        "451 4.7.1 try later",
    );
    spool
        .inner
        .shared
        .append_journal_record(RecordType::RecipientOutcome, id, &payload)
        .unwrap()
}

/// Segment files present, with their sizes.
fn files_with_sizes(directory: &Path) -> BTreeMap<u64, u64> {
    segment_files(directory)
        .into_iter()
        .map(|number| {
            let size = std::fs::metadata(segment_path(directory, number))
                .unwrap()
                .len();
            (number, size)
        })
        .collect()
}

fn open_segments(spool: &Spool) -> BTreeSet<u64> {
    spool
        .inner
        .shared
        .open_segment_numbers()
        .into_iter()
        .collect()
}

/// The segments present are exactly the active and spare ones.
fn assert_only_open_segments_remain(directory: &Path, spool: &Spool) {
    let present: BTreeSet<u64> = segment_files(directory).into_iter().collect();
    assert_eq!(present, open_segments(spool));
}

fn corrupt_reason(result: Result<Body, SpoolError>) -> &'static str {
    match result {
        Err(SpoolError::Corrupt { reason, .. }) => reason,
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// Appends numbered messages of the given sizes (without waiting).
fn append_sized(spool: &Spool, numbered_sizes: &[(usize, usize)]) -> Vec<AppendReceipt> {
    numbered_sizes
        .iter()
        .map(|&(n, size)| {
            spool
                .append_message(&TestEnvelope::numbered(n).envelope(), &body(n, size))
                .unwrap()
        })
        .collect()
}

#[test]
fn body_is_byte_exact_in_active_sealed_and_earlier_sessions_segments() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    // Sizes from empty to a record that needs a dedicated segment.
    let sizes: Vec<(usize, usize)> = (0..40)
        .map(|n| (n, if n == 17 { 20_000 } else { (n * 37) % 700 }))
        .collect();
    let receipts = append_sized(&spool, &sizes);
    // Bodies are readable before their commit, too: the record is complete when its
    // location is handed out.
    for (receipt, &(n, size)) in receipts.iter().zip(&sizes) {
        assert_eq!(
            &*spool.body(receipt.id, receipt.location).unwrap(),
            &body(n, size)[..]
        );
    }
    waiter.wait(receipts.last().unwrap().sequence).unwrap();
    let open = open_segments(&spool);
    let segments: HashSet<u64> = receipts.iter().map(|r| r.location.segment).collect();
    assert!(segments.len() >= 5, "only {} segments", segments.len());
    assert!(
        open.contains(&receipts.last().unwrap().location.segment),
        "the last message should sit in the active segment"
    );
    let first = spool.body(receipts[0].id, receipts[0].location).unwrap();
    let dedicated = spool.body(receipts[17].id, receipts[17].location).unwrap();
    assert_eq!(dedicated.len(), 20_000);
    assert_eq!(first.location(), receipts[0].location);
    let debug = format!("{first:?}");
    assert!(debug.contains("size_bytes: 0"), "{debug}");

    // More segments get sealed and created; bodies taken earlier stay valid.
    let later: Vec<(usize, usize)> = (40..80).map(|n| (n, 500)).collect();
    let later_receipts = append_sized(&spool, &later);
    waiter
        .wait(later_receipts.last().unwrap().sequence)
        .unwrap();
    assert!(!open_segments(&spool).contains(&receipts[0].location.segment));
    let held_active = spool
        .body(later_receipts[39].id, later_receipts[39].location)
        .unwrap();
    assert_eq!(&*first, &body(0, 0)[..]);
    assert_eq!(&*dedicated, &body(17, 20_000)[..]);
    spool.shutdown();
    drop(spool);
    // Even with the writer gone.
    assert_eq!(&*held_active, &body(79, 500)[..]);

    // A new session reads the old segments through mappings made on demand.
    let (spool, report) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    assert_eq!(report.messages.len(), 80);
    let all_sizes: HashMap<MessageId, (usize, usize)> = receipts
        .iter()
        .chain(&later_receipts)
        .map(|r| r.id)
        .zip(sizes.iter().chain(&later).copied())
        .collect();
    for message in &report.messages {
        let (n, size) = all_sizes[&message.id];
        assert_eq!(
            &*spool.body(message.id, message.location).unwrap(),
            &body(n, size)[..]
        );
    }
}

#[test]
fn bodies_read_while_appends_continue_are_exact() {
    const MESSAGES: usize = 400;
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(16 * 1024)).unwrap();
    let (sender, receiver) = mpsc::sync_channel::<(usize, AppendReceipt)>(16);
    let receiver = Arc::new(Mutex::new(receiver));
    std::thread::scope(|scope| {
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let receiver = Arc::clone(&receiver);
                let spool = spool.clone();
                scope.spawn(move || {
                    let mut read = 0;
                    loop {
                        let next = receiver.lock().unwrap().recv();
                        let Ok((n, receipt)) = next else { return read };
                        let got = spool.body(receipt.id, receipt.location).unwrap();
                        assert_eq!(&*got, &body(n, n % 3000)[..], "message {n}");
                        read += 1;
                    }
                })
            })
            .collect();
        for n in 0..MESSAGES {
            let receipt = spool
                .append_message(&TestEnvelope::numbered(n).envelope(), &body(n, n % 3000))
                .unwrap();
            sender.send((n, receipt)).unwrap();
        }
        drop(sender);
        let read: usize = readers.into_iter().map(|r| r.join().unwrap()).sum();
        assert_eq!(read, MESSAGES);
    });
}

#[test]
fn body_refuses_wrong_ids_and_locations() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let receipts = append_durably(&spool, &waiter, 0, 3, 200);
    let (journal, sequence) = append_done(&spool, receipts[0].id);
    waiter.wait(sequence).unwrap();
    let at = |location: RecordLocation, offset_bytes: u64| RecordLocation {
        offset_bytes,
        ..location
    };
    let second = receipts[1].location;
    let record_size = receipts[2].location.offset_bytes - second.offset_bytes;
    let written_end = journal.offset_bytes + 48;
    let checks = |spool: &Spool, this_session: bool| {
        let cases: Vec<(&str, MessageId, RecordLocation, &str)> = vec![
            (
                "another message's id",
                receipts[0].id,
                second,
                "record holds a different message id",
            ),
            (
                "inside a record",
                receipts[1].id,
                at(second, second.offset_bytes + 8),
                "record magic is wrong",
            ),
            (
                "misaligned",
                receipts[1].id,
                at(second, second.offset_bytes + 1),
                "record offset is not a record boundary",
            ),
            (
                "the segment header",
                receipts[1].id,
                at(second, 0),
                "record offset lies inside the segment header",
            ),
            (
                "a journal record",
                receipts[0].id,
                journal,
                "record is not a message record",
            ),
            (
                "past the end of the file",
                receipts[1].id,
                at(second, u64::MAX - 7),
                "record extends past the end of the segment",
            ),
        ];
        for (what, id, location, reason) in cases {
            assert_eq!(corrupt_reason(spool.body(id, location)), reason, "{what}");
        }
        // Past what has been written: zeros there in the file, and not yet final while the
        // segment is active.
        let expected = if this_session {
            "record lies beyond what has been appended to the segment"
        } else {
            "record magic is wrong"
        };
        assert_eq!(
            corrupt_reason(spool.body(receipts[2].id, at(second, written_end))),
            expected
        );
        let missing = RecordLocation {
            segment: 0xdead,
            offset_bytes: 64,
        };
        assert!(matches!(
            spool.body(receipts[1].id, missing),
            Err(SpoolError::NotFound { id }) if id == receipts[1].id
        ));
        assert_eq!(
            &*spool.body(receipts[1].id, second).unwrap(),
            &body(1, 200)[..]
        );
    };
    assert_eq!(second.segment, journal.segment, "all in the active segment");
    assert!(record_size > 0);
    checks(&spool, true);
    spool.shutdown();
    drop(spool);
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    checks(&spool, false);
}

#[test]
fn body_detects_a_corrupted_byte() {
    // A segment of this session, sealed: the byte changes under the read mapping.
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let receipts = append_durably(&spool, &waiter, 0, 30, 300);
    let victim = receipts[1];
    assert!(!open_segments(&spool).contains(&victim.location.segment));
    let path = segment_path(directory.path(), victim.location.segment);
    let mut length = [0u8; 4];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut length, victim.location.offset_bytes + 8)
        .unwrap();
    let payload_end = victim.location.offset_bytes
        + RECORD_HEADER_SIZE_BYTES as u64
        + u64::from(u32::from_le_bytes(length));
    assert!(payload_end < receipts[2].location.offset_bytes);
    // The last byte of the body, and a byte of the envelope.
    for offset in [payload_end - 1, victim.location.offset_bytes + 40] {
        flip_byte(&path, offset);
        assert_eq!(
            corrupt_reason(spool.body(victim.id, victim.location)),
            "record payload checksum mismatch",
            "byte {offset}"
        );
        flip_byte(&path, offset);
        assert_eq!(
            &*spool.body(victim.id, victim.location).unwrap(),
            &body(1, 300)[..]
        );
    }
    // A byte of the record header.
    flip_byte(&path, victim.location.offset_bytes + 9);
    assert_eq!(
        corrupt_reason(spool.body(victim.id, victim.location)),
        "record header checksum mismatch"
    );
    spool.shutdown();
    drop(spool);

    // A segment of an earlier session: recovery quarantines the record, body() refuses it.
    let (spool, report) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    assert!(
        report
            .messages
            .iter()
            .all(|message| message.id != victim.id)
    );
    assert_eq!(
        corrupt_reason(spool.body(victim.id, victim.location)),
        "record header checksum mismatch"
    );
    assert_eq!(
        &*spool.body(receipts[0].id, receipts[0].location).unwrap(),
        &body(0, 300)[..]
    );
}

#[test]
fn reclaim_deletes_every_sealed_segment_once_all_messages_are_done() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let receipts = append_durably(&spool, &waiter, 0, 60, 300);
    let message_segments: BTreeSet<u64> = receipts.iter().map(|r| r.location.segment).collect();
    assert!(message_segments.len() >= 4);
    // Nothing is done: nothing goes.
    let before = files_with_sizes(directory.path());
    assert_eq!(spool.reclaim().unwrap(), ReclaimReport::default());
    assert_eq!(files_with_sizes(directory.path()), before);
    let held = spool.body(receipts[0].id, receipts[0].location).unwrap();

    let last = receipts
        .iter()
        .map(|receipt| {
            spool
                .append_message_done(receipt.id, 1, DoneReason::AllRecipientsFinal)
                .unwrap()
        })
        .max()
        .unwrap();
    waiter.wait(last).unwrap();
    let before = files_with_sizes(directory.path());
    let report = spool.reclaim().unwrap();
    assert_only_open_segments_remain(directory.path(), &spool);
    let after: BTreeSet<u64> = segment_files(directory.path()).into_iter().collect();
    let deleted: Vec<u64> = before
        .keys()
        .copied()
        .filter(|n| !after.contains(n))
        .collect();
    assert!(
        message_segments
            .iter()
            .all(|n| after.contains(n) || deleted.contains(n))
    );
    assert_eq!(report.segments_deleted, deleted.len());
    assert_eq!(
        report.bytes_freed,
        deleted.iter().map(|n| before[n]).sum::<u64>()
    );
    assert!(report.segments_deleted >= message_segments.len() - 1);
    // Nothing left to do, and the bookkeeping of the deleted segments is gone.
    assert_eq!(spool.reclaim().unwrap(), ReclaimReport::default());
    assert_eq!(spool.inner.shared.tracked_counts().0, after.len());
    // A body taken before stays readable; the message is gone for new readers.
    assert_eq!(&*held, &body(0, 300)[..]);
    assert!(matches!(
        spool.body(receipts[0].id, receipts[0].location),
        Err(SpoolError::NotFound { .. })
    ));
    spool.shutdown();
    drop(spool);

    // After a restart, the old active segment (done records, maybe done messages) goes on
    // the first pass, and nothing comes back.
    let (spool, report) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    assert!(
        report
            .messages
            .iter()
            .all(|m| m.state == MessageState::Done)
    );
    assert!(report.quarantined.is_empty() && report.torn_tails.is_empty());
    let reclaimed = spool.reclaim().unwrap();
    assert!(reclaimed.segments_deleted >= 1);
    assert_only_open_segments_remain(directory.path(), &spool);
    assert_eq!(
        spool.inner.shared.tracked_counts(),
        (open_segments(&spool).len(), 0)
    );
}

/// Which segments must stay when `undone` messages are not done, by the format's rule,
/// worked out independently of the tracker: the segments of undone messages, the open ones,
/// and every segment with a journal record naming a message of a segment that stays.
fn expected_survivors(
    message_segment: &HashMap<MessageId, u64>,
    journal: &[(u64, MessageId)],
    undone: &HashSet<MessageId>,
    open: &BTreeSet<u64>,
) -> BTreeSet<u64> {
    let mut staying: BTreeSet<u64> = undone.iter().map(|id| message_segment[id]).collect();
    staying.extend(open);
    loop {
        let more: Vec<u64> = journal
            .iter()
            .filter(|(segment, id)| {
                !staying.contains(segment)
                    && message_segment
                        .get(id)
                        .is_some_and(|target| target != segment && staying.contains(target))
            })
            .map(|(segment, _)| *segment)
            .collect();
        if more.is_empty() {
            return staying;
        }
        staying.extend(more);
    }
}

#[test]
fn an_undone_message_keeps_its_segment_and_the_segments_that_name_it() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let mut message_segment = HashMap::new();
    let mut journal = Vec::new();
    let mut receipts = Vec::new();
    // Messages and journal records interleave, as under delivery: each batch of messages is
    // followed by the done records of the previous batch.
    // The straggler is message 10, of the second batch: deferred, never done.
    const STRAGGLER: usize = 10;
    let mut previous: Vec<AppendReceipt> = Vec::new();
    for batch in 0..6 {
        let appended = append_durably(&spool, &waiter, batch * 8, 8, 300);
        for receipt in &appended {
            message_segment.insert(receipt.id, receipt.location.segment);
        }
        receipts.extend(appended.iter().copied());
        for receipt in &previous {
            if receipt.id == receipts[STRAGGLER].id {
                let (location, _) = append_deferred(&spool, receipt.id);
                journal.push((location.segment, receipt.id));
            } else {
                let (location, _) = append_done(&spool, receipt.id);
                journal.push((location.segment, receipt.id));
            }
        }
        previous = appended;
    }
    let straggler = receipts[STRAGGLER];
    // The last batch is done too.
    for receipt in &previous {
        let (location, sequence) = append_done(&spool, receipt.id);
        journal.push((location.segment, receipt.id));
        waiter.wait(sequence).unwrap();
    }
    let done_ids: HashSet<MessageId> = journal
        .iter()
        .map(|(_, id)| *id)
        .filter(|id| *id != straggler.id)
        .collect();
    assert_eq!(done_ids.len(), receipts.len() - 1);
    let undone = HashSet::from([straggler.id]);

    let before: BTreeSet<u64> = segment_files(directory.path()).into_iter().collect();
    let report = spool.reclaim().unwrap();
    let after: BTreeSet<u64> = segment_files(directory.path()).into_iter().collect();
    let expected = expected_survivors(&message_segment, &journal, &undone, &open_segments(&spool));
    assert_eq!(after, &before & &expected, "survivors");
    assert!(after.contains(&straggler.location.segment));
    // The first segment holds only done messages and names nothing: it went.
    assert!(!after.contains(&receipts[0].location.segment));
    assert_eq!(report.segments_deleted, before.len() - after.len());
    assert_eq!(
        &*spool.body(straggler.id, straggler.location).unwrap(),
        &body(10, 300)[..]
    );
    spool.shutdown();
    drop(spool);

    // Reopen: the straggler is queued with its journal, done messages still present are
    // done, none comes back as queued.
    let (spool, report) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let queued: Vec<&SpooledMessage> = report
        .messages
        .iter()
        .filter(|m| m.state == MessageState::Queued)
        .collect();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].id, straggler.id);
    assert_eq!(queued[0].recipient_states[0].attempts, 1);
    assert!(
        report
            .messages
            .iter()
            .all(|m| m.id == straggler.id || done_ids.contains(&m.id))
    );
    assert!(report.quarantined.is_empty() && report.torn_tails.is_empty());
    let waiter = CommitWaiter::subscribe(&spool);
    // Still nothing more may go.
    spool.reclaim().unwrap();
    assert!(segment_files(directory.path()).contains(&straggler.location.segment));
    assert_eq!(
        &*spool.body(straggler.id, straggler.location).unwrap(),
        &body(10, 300)[..]
    );

    let sequence = spool
        .append_message_done(straggler.id, 2, DoneReason::AllRecipientsFinal)
        .unwrap();
    waiter.wait(sequence).unwrap();
    let report = spool.reclaim().unwrap();
    assert!(report.segments_deleted >= 1);
    assert_only_open_segments_remain(directory.path(), &spool);
    spool.shutdown();
    drop(spool);
    let report = scan(directory.path()).unwrap();
    assert!(
        report
            .messages
            .iter()
            .all(|m| m.state == MessageState::Done)
    );
}

#[test]
fn reclaim_finishes_a_deletion_a_crash_interrupted() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let receipts = append_durably(&spool, &waiter, 0, 20, 300);
    let first = receipts[0].location.segment;
    let in_first: Vec<MessageId> = receipts
        .iter()
        .filter(|r| r.location.segment == first)
        .map(|r| r.id)
        .collect();
    let last = in_first
        .iter()
        .map(|id| append_done(&spool, *id).1)
        .max()
        .unwrap();
    waiter.wait(last).unwrap();
    let path = segment_path(directory.path(), first);
    let saved = std::fs::read(&path).unwrap();
    let report = spool.reclaim().unwrap();
    assert_eq!(report.segments_deleted, 1);
    assert_eq!(report.bytes_freed, saved.len() as u64);
    assert!(!path.exists());
    spool.shutdown();
    drop(spool);

    // The unlink never reached the disk: the file is back after the "crash".
    std::fs::write(&path, &saved).unwrap();
    let (spool, report) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    for id in &in_first {
        let message = report.messages.iter().find(|m| m.id == *id).unwrap();
        assert_eq!(message.state, MessageState::Done, "done stays done");
    }
    let queued: HashSet<MessageId> = report
        .messages
        .iter()
        .filter(|m| m.state == MessageState::Queued)
        .map(|m| m.id)
        .collect();
    let expected: HashSet<MessageId> = receipts
        .iter()
        .map(|r| r.id)
        .filter(|id| !in_first.contains(id))
        .collect();
    assert_eq!(queued, expected);
    let report = spool.reclaim().unwrap();
    assert_eq!(report.segments_deleted, 1);
    assert_eq!(report.bytes_freed, saved.len() as u64);
    assert!(!path.exists());
}

#[test]
fn a_done_record_counts_only_once_a_successful_commit_covers_it() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let receipts = append_durably(&spool, &waiter, 0, 30, 300);
    let segment_of = |index: usize| receipts[index].location.segment;
    let ids_in = |segment: u64| -> Vec<MessageId> {
        receipts
            .iter()
            .filter(|r| r.location.segment == segment)
            .map(|r| r.id)
            .collect()
    };

    // Not synced yet.
    let first = segment_of(0);
    spool.inner.shared.hold_commits(true);
    let sequences: Vec<u64> = ids_in(first)
        .into_iter()
        .map(|id| append_done(&spool, id).1)
        .collect();
    assert_eq!(spool.reclaim().unwrap(), ReclaimReport::default());
    assert!(segment_files(directory.path()).contains(&first));
    spool.inner.shared.hold_commits(false);
    waiter.wait(*sequences.last().unwrap()).unwrap();
    assert_eq!(spool.reclaim().unwrap().segments_deleted, 1);
    assert!(!segment_files(directory.path()).contains(&first));

    // Synced, but the sync failed: proves nothing. (Held, so that one batch takes them all.)
    let second = receipts
        .iter()
        .map(|r| r.location.segment)
        .find(|s| *s > first)
        .unwrap();
    spool.inner.shared.hold_commits(true);
    let sequences: Vec<u64> = ids_in(second)
        .into_iter()
        .map(|id| append_done(&spool, id).1)
        .collect();
    spool
        .inner
        .shared
        .fail_next_sync
        .store(true, Ordering::Release);
    spool.inner.shared.hold_commits(false);
    assert!(waiter.wait(*sequences.last().unwrap()).is_err());
    spool.reclaim().unwrap();
    assert!(segment_files(directory.path()).contains(&second));
    // Journaled again, successfully this time.
    let sequences: Vec<u64> = ids_in(second)
        .into_iter()
        .map(|id| append_done(&spool, id).1)
        .collect();
    waiter.wait(*sequences.last().unwrap()).unwrap();
    assert!(spool.reclaim().unwrap().segments_deleted >= 1);
    assert!(!segment_files(directory.path()).contains(&second));
}

#[test]
fn damaged_segments_go_only_once_the_damage_is_copied_to_quarantine() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let receipts = append_durably(&spool, &waiter, 0, 20, 300);
    let last = receipts
        .iter()
        .map(|r| append_done(&spool, r.id).1)
        .max()
        .unwrap();
    waiter.wait(last).unwrap();
    spool.shutdown();
    drop(spool);
    // Damage in the middle of the first segment.
    let damaged = receipts[1];
    let path = segment_path(directory.path(), damaged.location.segment);
    flip_byte(&path, damaged.location.offset_bytes + 100);
    // The quarantine directory cannot be created: the copy fails.
    let blocker = directory.path().join("quarantine");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let (spool, report) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    assert_eq!(report.quarantined.len(), 1);
    spool.reclaim().unwrap();
    assert!(path.exists(), "damage without a copy keeps its segment");
    spool.shutdown();
    drop(spool);

    std::fs::remove_file(&blocker).unwrap();
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let copy = directory.path().join("quarantine").join(format!(
        "{:016x}-{:016x}.record",
        damaged.location.segment, damaged.location.offset_bytes
    ));
    assert!(copy.exists());
    spool.reclaim().unwrap();
    assert!(!path.exists());
    assert_only_open_segments_remain(directory.path(), &spool);
}

/// Found by the reclaim property test: once reclaim has deleted the highest-numbered
/// segments, a new session numbers its segments from the highest one left, so numbers come
/// back. A quarantine copy is named after its segment's number, so those must not.
#[test]
fn segment_numbers_named_in_quarantine_are_not_used_again() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let receipts = append_durably(&spool, &waiter, 0, 20, 300);
    let last = receipts
        .iter()
        .map(|r| append_done(&spool, r.id).1)
        .max()
        .unwrap();
    waiter.wait(last).unwrap();
    spool.shutdown();
    drop(spool);
    let highest_used = *segment_files(directory.path()).last().unwrap();
    let damaged = receipts.last().unwrap().location;
    flip_byte(
        &segment_path(directory.path(), damaged.segment),
        damaged.offset_bytes + 100,
    );
    // The damage is copied, then every segment is reclaimed and the empty active one
    // removed at shutdown: no segment file is left.
    let (spool, report) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    assert_eq!(report.quarantined.len() + report.torn_tails.len(), 1);
    spool.reclaim().unwrap();
    spool.shutdown();
    drop(spool);
    assert!(segment_files(directory.path()).is_empty());
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let first = spool.inner.shared.open_segment_numbers()[0];
    assert!(
        first > damaged.segment,
        "segment {first} reuses a number quarantine/ names (up to {}; {highest_used} was used)",
        damaged.segment
    );
}

#[test]
fn segments_recovery_could_not_read_fully_stay_and_empty_ones_go() {
    let directory = tempfile::tempdir().unwrap();
    // A segment whose header is damaged: its records are unknown.
    write_foreign_segment(
        directory.path(),
        10,
        Salt(3),
        &[message_record(Salt(3), MessageId(1), 4, b"x")],
    );
    flip_byte(&segment_path(directory.path(), 10), 20);
    // A segment holding a record of a type a later minor version added, next to a message
    // that is done.
    let mut unknown = framed(Salt(9), RecordType::Message, b"from the future");
    unknown[12..14].copy_from_slice(&77u16.to_le_bytes());
    let header_checksum = Salt(9).checksum(&[&unknown[8..RECORD_HEADER_SIZE_BYTES]]);
    unknown[4..8].copy_from_slice(&header_checksum.to_le_bytes());
    let done = framed(
        Salt(9),
        RecordType::MessageDone,
        &format::encode_message_done(MessageId(5), 1, DoneReason::AllRecipientsFinal),
    );
    write_foreign_segment(
        directory.path(),
        11,
        Salt(9),
        &[
            message_record(Salt(9), MessageId(5), 1, b"hello"),
            unknown,
            done,
        ],
    );
    // An empty segment (a spare a crash left behind) and a segment of done messages only.
    write_foreign_segment(directory.path(), 12, Salt(9), &[]);
    let done = framed(
        Salt(9),
        RecordType::MessageDone,
        &format::encode_message_done(MessageId(6), 1, DoneReason::Deleted),
    );
    write_foreign_segment(
        directory.path(),
        13,
        Salt(9),
        &[message_record(Salt(9), MessageId(6), 2, b"bye"), done],
    );
    let (spool, report) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    assert_eq!(report.quarantined.len(), 1);
    let report = spool.reclaim().unwrap();
    assert_eq!(report.segments_deleted, 2);
    assert_eq!(report.bytes_freed, 2 * 8192);
    let present: BTreeSet<u64> = segment_files(directory.path()).into_iter().collect();
    let mut expected: BTreeSet<u64> = [10, 11].into();
    expected.extend(open_segments(&spool));
    assert_eq!(present, expected);
}

#[test]
fn concurrent_reclaims_delete_each_segment_once() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let deleted: usize = std::thread::scope(|scope| {
        let reclaimers: Vec<_> = (0..3)
            .map(|_| {
                let spool = spool.clone();
                scope.spawn(move || {
                    let mut deleted = 0;
                    for _ in 0..200 {
                        deleted += spool.reclaim().unwrap().segments_deleted;
                        std::thread::yield_now();
                    }
                    deleted
                })
            })
            .collect();
        for batch in 0..10 {
            let receipts = append_durably(&spool, &waiter, batch * 10, 10, 300);
            let last = receipts
                .iter()
                .map(|r| {
                    spool
                        .append_message_done(r.id, 1, DoneReason::AllRecipientsFinal)
                        .unwrap()
                })
                .max()
                .unwrap();
            waiter.wait(last).unwrap();
        }
        reclaimers.into_iter().map(|r| r.join().unwrap()).sum()
    });
    let last_pass = spool.reclaim().unwrap().segments_deleted;
    assert!(deleted + last_pass >= 5, "deleted {deleted} + {last_pass}");
    assert_only_open_segments_remain(directory.path(), &spool);
}

/// One step of the reclaim property test.
#[derive(Debug, Clone)]
enum Step {
    /// Appends messages with these body sizes and waits for their commit.
    Append(Vec<usize>),
    /// Journals a deferred outcome for one of the queued messages (picked by index).
    Defer(usize),
    /// Journals added header fields for one of the queued messages (picked by index),
    /// replacing any earlier ones.
    AddFields(usize),
    /// Marks a run of queued messages done, in id order from the one picked by index (runs
    /// make whole segments done while older ones are not), and waits for the commit.
    Done {
        pick: usize,
        count: usize,
    },
    Reclaim,
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => prop::collection::vec(prop_oneof![6 => 0usize..900, 1 => 4000usize..6000], 1..6)
            .prop_map(Step::Append),
        1 => any::<usize>().prop_map(Step::Defer),
        1 => any::<usize>().prop_map(Step::AddFields),
        4 => (any::<usize>(), 1usize..12).prop_map(|(pick, count)| Step::Done { pick, count }),
        2 => Just(Step::Reclaim),
        1 => Just(Step::Reopen),
    ]
}

/// What the test knows about one message.
#[derive(Debug, Clone, Copy)]
struct Known {
    n: usize,
    size: usize,
    location: RecordLocation,
}

/// The latest added fields the test journaled per queued message: where and what.
type KnownFields = HashMap<MessageId, (RecordLocation, String)>;

/// Every queued message is intact and readable, with its latest added fields; no done one
/// is queued again.
fn check_recovery(
    report: &ScanReport,
    queued: &BTreeMap<MessageId, Known>,
    done: &HashSet<MessageId>,
    fields: &KnownFields,
) -> Result<(), TestCaseError> {
    prop_assert!(report.quarantined.is_empty() && report.torn_tails.is_empty());
    for (id, known) in queued {
        let message = report.messages.iter().find(|m| m.id == *id);
        prop_assert!(message.is_some(), "queued message {} lost", id);
        let message = message.unwrap();
        prop_assert_eq!(message.state, MessageState::Queued);
        prop_assert_eq!(message.location, known.location);
        prop_assert_eq!(
            message.added_fields,
            fields.get(id).map(|(location, _)| *location),
            "added fields of {}",
            id
        );
    }
    for message in &report.messages {
        if done.contains(&message.id) {
            prop_assert_eq!(
                message.state,
                MessageState::Done,
                "done message {} resurrected",
                message.id
            );
        } else {
            prop_assert!(
                queued.contains_key(&message.id),
                "unknown message {}",
                message.id
            );
        }
    }
    Ok(())
}

fn check_bodies(
    spool: &Spool,
    queued: &BTreeMap<MessageId, Known>,
    done: &HashSet<MessageId>,
    locations: &HashMap<MessageId, RecordLocation>,
    fields: &KnownFields,
) -> Result<(), TestCaseError> {
    for (id, known) in queued {
        let got = spool.body(*id, known.location);
        prop_assert!(got.is_ok(), "body of {}: {:?}", id, got);
        prop_assert_eq!(&*got.unwrap(), &body(known.n, known.size)[..]);
        if let Some((location, text)) = fields.get(id) {
            let got = spool.added_fields(*id, *location);
            prop_assert!(got.is_ok(), "added fields of {}: {:?}", id, got);
            prop_assert_eq!(&*got.unwrap(), text.as_bytes());
        }
    }
    for id in done {
        let Some(location) = locations.get(id) else {
            continue;
        };
        // Still there, or reclaimed; never damaged.
        match spool.body(*id, *location) {
            Ok(_) | Err(SpoolError::NotFound { .. }) => {}
            Err(error) => prop_assert!(false, "body of done {}: {}", id, error),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn reclaim_never_loses_a_queued_message_nor_resurrects_a_done_one(
        steps in prop::collection::vec(step(), 1..60)
    ) {
        let directory = tempfile::tempdir().unwrap();
        let open = || Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
        let (mut spool, _) = open();
        let mut waiter = CommitWaiter::subscribe(&spool);
        let mut queued: BTreeMap<MessageId, Known> = BTreeMap::new();
        let mut done: HashSet<MessageId> = HashSet::new();
        let mut locations: HashMap<MessageId, RecordLocation> = HashMap::new();
        let mut fields = KnownFields::new();
        let mut next_n = 0usize;
        for step in steps {
            match step {
                Step::Append(sizes) => {
                    let numbered: Vec<(usize, usize)> = sizes
                        .iter()
                        .enumerate()
                        .map(|(i, &size)| (next_n + i, size))
                        .collect();
                    next_n += sizes.len();
                    let receipts = append_sized(&spool, &numbered);
                    waiter.wait(receipts.last().unwrap().sequence).unwrap();
                    for (receipt, (n, size)) in receipts.iter().zip(numbered) {
                        queued.insert(receipt.id, Known { n, size, location: receipt.location });
                        locations.insert(receipt.id, receipt.location);
                    }
                }
                Step::Defer(pick) => {
                    if let Some(id) = queued.keys().nth(pick % queued.len().max(1)).copied() {
                        let sequence = spool
                            .append_recipient_outcome(id, 0, OutcomeKind::Deferred, 5, "451 later")
                            .unwrap();
                        waiter.wait(sequence).unwrap();
                    }
                }
                Step::AddFields(pick) => {
                    if let Some(id) = queued.keys().nth(pick % queued.len().max(1)).copied() {
                        let text = format!("DKIM-Signature: v=1; b={pick:x}\r\n");
                        let (location, sequence) =
                            spool.append_added_fields(id, 6, &text).unwrap();
                        waiter.wait(sequence).unwrap();
                        fields.insert(id, (location, text));
                    }
                }
                Step::Done { pick, count } => {
                    let run: Vec<MessageId> = queued
                        .keys()
                        .skip(pick % queued.len().max(1))
                        .take(count)
                        .copied()
                        .collect();
                    let mut last = None;
                    for id in run {
                        last = Some(
                            spool
                                .append_message_done(id, 7, DoneReason::AllRecipientsFinal)
                                .unwrap(),
                        );
                        queued.remove(&id);
                        fields.remove(&id);
                        done.insert(id);
                    }
                    if let Some(sequence) = last {
                        waiter.wait(sequence).unwrap();
                    }
                }
                Step::Reclaim => {
                    spool.reclaim().unwrap();
                    check_bodies(&spool, &queued, &done, &locations, &fields)?;
                }
                Step::Reopen => {
                    spool.shutdown();
                    drop(spool);
                    check_recovery(&scan(directory.path()).unwrap(), &queued, &done, &fields)?;
                    let (reopened, report) = open();
                    check_recovery(&report, &queued, &done, &fields)?;
                    // A reclaimed segment's number may be used again by a new session, so
                    // only locations this session's recovery reported still mean anything.
                    let listed: HashSet<MessageId> = report.messages.iter().map(|m| m.id).collect();
                    locations.retain(|id, _| listed.contains(id));
                    spool = reopened;
                    waiter = CommitWaiter::subscribe(&spool);
                    check_bodies(&spool, &queued, &done, &locations, &fields)?;
                }
            }
        }
        // In the end everything is done: after a restart and one pass nothing but the new
        // active segment is left (nothing leaks).
        for id in std::mem::take(&mut queued).into_keys() {
            let sequence = spool.append_message_done(id, 9, DoneReason::Deleted).unwrap();
            waiter.wait(sequence).unwrap();
            done.insert(id);
        }
        fields.clear();
        spool.reclaim().unwrap();
        spool.shutdown();
        drop(spool);
        let (spool, report) = open();
        check_recovery(&report, &queued, &done, &fields)?;
        spool.reclaim().unwrap();
        let present: BTreeSet<u64> = segment_files(directory.path()).into_iter().collect();
        prop_assert_eq!(present, open_segments(&spool));
    }
}
