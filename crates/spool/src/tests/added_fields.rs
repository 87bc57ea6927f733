//! Tests of added-header-fields records (type 4): appending, lending, recovery's fold,
//! refusals, and their place in reclaim's rule 3.

use std::collections::BTreeSet;

use super::*;

const SIGNATURE: &str =
    "DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=s1;\r\n\tb=c2lnbmF0dXJl\r\n";
const REPLACEMENT: &str = concat!(
    "DKIM-Signature: v=1; a=ed25519-sha256; d=example.com; s=s2; b=bmV3\r\n",
    "List-Unsubscribe: <https://example.com/u>\r\n",
);

fn corrupt_reason<T: std::fmt::Debug>(result: Result<T, SpoolError>) -> &'static str {
    match result {
        Err(SpoolError::Corrupt { reason, .. }) => reason,
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

fn message_of(report: &ScanReport, id: MessageId) -> &SpooledMessage {
    report.messages.iter().find(|m| m.id == id).unwrap()
}

#[test]
fn latest_added_fields_count_and_are_lent_exactly_before_and_after_reopen() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let receipts = append_durably(&spool, &waiter, 0, 3, 100);
    let (first, second, third) = (receipts[0].id, receipts[1].id, receipts[2].id);
    let (replaced, _) = spool.append_added_fields(first, 10, SIGNATURE).unwrap();
    let (latest, _) = spool.append_added_fields(first, 20, REPLACEMENT).unwrap();
    let (second_fields, _) = spool.append_added_fields(second, 30, SIGNATURE).unwrap();
    // Empty fields are a valid record: they replace earlier ones with nothing.
    let (emptied, _) = spool.append_added_fields(third, 40, SIGNATURE).unwrap();
    let (empty, _) = spool.append_added_fields(third, 50, "").unwrap();
    // A message that is not in the spool: ignored by recovery.
    let (_, last) = spool
        .append_added_fields(MessageId(third.0 + 1_000), 60, SIGNATURE)
        .unwrap();
    waiter.wait(last).unwrap();
    let lent = |spool: &Spool| {
        for (id, location, fields) in [
            (first, replaced, SIGNATURE),
            (first, latest, REPLACEMENT),
            (second, second_fields, SIGNATURE),
            (third, emptied, SIGNATURE),
            (third, empty, ""),
        ] {
            let added = spool.added_fields(id, location).unwrap();
            assert_eq!(&*added, fields.as_bytes());
            assert_eq!(added.location(), location);
        }
    };
    // In the active segment, read while it is still appended to.
    assert!(open_segment_numbers(&spool).contains(&latest.segment));
    lent(&spool);
    spool.shutdown();
    drop(spool);

    let check = |report: &ScanReport| {
        assert!(report.quarantined.is_empty());
        assert_eq!(message_of(report, first).added_fields, Some(latest));
        assert_eq!(message_of(report, second).added_fields, Some(second_fields));
        assert_eq!(message_of(report, third).added_fields, Some(empty));
        assert_eq!(
            read_added_fields(directory.path(), first, latest).unwrap(),
            REPLACEMENT.as_bytes()
        );
        assert_eq!(
            read_added_fields(directory.path(), third, empty).unwrap(),
            b""
        );
    };
    check(&scan(directory.path()).unwrap());
    let (spool, report) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    check(&report);
    lent(&spool);
    // New ids stay above the id only the ignored record names.
    let receipt = spool
        .append_message(&TestEnvelope::numbered(9).envelope(), &body(9, 10))
        .unwrap();
    assert!(receipt.id.0 > third.0 + 1_000);
}

fn open_segment_numbers(spool: &Spool) -> Vec<u64> {
    spool.inner.shared.open_segment_numbers()
}

#[test]
fn added_fields_refuse_wrong_ids_and_other_records() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let receipts = append_durably(&spool, &waiter, 0, 2, 100);
    let (fields, sequence) = spool
        .append_added_fields(receipts[0].id, 1, SIGNATURE)
        .unwrap();
    waiter.wait(sequence).unwrap();
    let checks = |spool: &Spool| {
        assert_eq!(
            corrupt_reason(spool.added_fields(receipts[1].id, fields)),
            "record holds a different message id"
        );
        assert_eq!(
            corrupt_reason(spool.added_fields(receipts[0].id, receipts[0].location)),
            "record is not an added header fields record"
        );
        assert_eq!(
            corrupt_reason(spool.body(receipts[0].id, fields)),
            "record is not a message record"
        );
        let inside = RecordLocation {
            offset_bytes: fields.offset_bytes + 8,
            ..fields
        };
        assert_eq!(
            corrupt_reason(spool.added_fields(receipts[0].id, inside)),
            "record magic is wrong"
        );
        let missing = RecordLocation {
            segment: 0xdead,
            offset_bytes: 64,
        };
        assert!(matches!(
            spool.added_fields(receipts[0].id, missing),
            Err(SpoolError::NotFound { .. })
        ));
        assert_eq!(
            &*spool.added_fields(receipts[0].id, fields).unwrap(),
            SIGNATURE.as_bytes()
        );
    };
    checks(&spool);
    spool.shutdown();
    drop(spool);
    assert_eq!(
        corrupt_reason(read_added_fields(
            directory.path(),
            receipts[0].id,
            receipts[0].location
        )),
        "record is not an added header fields record"
    );
    assert_eq!(
        corrupt_reason(read_added_fields(directory.path(), receipts[1].id, fields)),
        "record holds a different message id"
    );
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    checks(&spool);
}

#[test]
fn the_writer_refuses_added_fields_it_would_have_to_cut() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let receipt = append_durably(&spool, &waiter, 0, 1, 100)[0];
    let too_long = format!(
        "X-Long: {}\r\n",
        "a".repeat(format::MAX_ADDED_FIELDS_BYTES - 9)
    );
    assert_eq!(too_long.len(), format::MAX_ADDED_FIELDS_BYTES + 1);
    for (fields, expected) in [
        (too_long.as_str(), format::ADDED_FIELDS_TOO_LONG),
        ("DKIM-Signature: v=1", format::ADDED_FIELDS_WITHOUT_CRLF),
        ("DKIM-Signature: v=1\n", format::ADDED_FIELDS_WITHOUT_CRLF),
    ] {
        match spool.append_added_fields(receipt.id, 1, fields) {
            Err(SpoolError::InvalidAddedFields { size_bytes, reason }) => {
                assert_eq!(size_bytes, fields.len());
                assert_eq!(reason, expected);
            }
            other => panic!("expected InvalidAddedFields, got {other:?}"),
        }
    }
    // Exactly at the limit is fine.
    let longest = format!(
        "X-Long: {}\r\n",
        "a".repeat(format::MAX_ADDED_FIELDS_BYTES - 10)
    );
    let (location, sequence) = spool.append_added_fields(receipt.id, 2, &longest).unwrap();
    waiter.wait(sequence).unwrap();
    assert_eq!(
        &*spool.added_fields(receipt.id, location).unwrap(),
        longest.as_bytes()
    );
    spool.shutdown();
    drop(spool);
    let report = scan(directory.path()).unwrap();
    assert!(report.quarantined.is_empty());
    assert_eq!(report.messages[0].added_fields, Some(location));
}

#[test]
fn added_fields_without_crlf_are_quarantined_by_the_reader() {
    let directory = tempfile::tempdir().unwrap();
    let salt = Salt(77);
    let id = MessageId(5);
    let added = |at: u64, fields: &[u8]| {
        let mut payload = id.0.to_le_bytes().to_vec();
        payload.extend_from_slice(&at.to_le_bytes());
        payload.extend_from_slice(&(fields.len() as u32).to_le_bytes());
        payload.extend_from_slice(fields);
        framed(salt, RecordType::AddedFields, &payload)
    };
    let message = message_record(salt, id, 1, b"hello");
    let good = added(1, SIGNATURE.as_bytes());
    let good_offset = (64 + message.len()) as u64;
    // A later record without its final CRLF must not replace the good one.
    let cut = added(2, b"DKIM-Signature: v=1; b=abc");
    let cut_offset = good_offset + good.len() as u64;
    write_foreign_segment(directory.path(), 1, salt, &[message, good, cut]);
    let report = scan(directory.path()).unwrap();
    assert_eq!(
        report.quarantined,
        vec![QuarantinedRecord {
            segment_path: segment_path(directory.path(), 1),
            offset_bytes: cut_offset,
            reason: format::ADDED_FIELDS_WITHOUT_CRLF,
        }]
    );
    assert_eq!(
        report.messages[0].added_fields,
        Some(RecordLocation {
            segment: 1,
            offset_bytes: good_offset,
        })
    );
    let location = RecordLocation {
        segment: 1,
        offset_bytes: cut_offset,
    };
    assert_eq!(
        corrupt_reason(read_added_fields(directory.path(), id, location)),
        format::ADDED_FIELDS_WITHOUT_CRLF
    );
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    assert_eq!(
        corrupt_reason(spool.added_fields(id, location)),
        format::ADDED_FIELDS_WITHOUT_CRLF
    );
}

/// Reclaim rule 3: a segment whose added-fields record names a queued message of an
/// earlier segment stays until that message's segment is gone, even when every message
/// stored in it is done; otherwise a restart would find the message without its fields.
#[test]
fn added_fields_keep_their_segment_until_the_message_segment_goes() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    // Two 1500-byte messages fill a 4096-byte segment.
    let early = append_durably(&spool, &waiter, 0, 2, 1500);
    let straggler = early[0];
    let later = append_durably(&spool, &waiter, 2, 1, 1500);
    assert_ne!(later[0].location.segment, straggler.location.segment);
    let (fields, _) = spool
        .append_added_fields(straggler.id, 1, SIGNATURE)
        .unwrap();
    assert_eq!(fields.segment, later[0].location.segment);
    // Seal the fields' segment, then everything but the straggler is done.
    let sealing = append_durably(&spool, &waiter, 3, 4, 1500);
    assert!(!open_segment_numbers(&spool).contains(&fields.segment));
    let mut last = 0;
    for receipt in early[1..].iter().chain(&later).chain(&sealing) {
        last = spool
            .append_message_done(receipt.id, 2, DoneReason::AllRecipientsFinal)
            .unwrap();
    }
    waiter.wait(last).unwrap();
    spool.reclaim().unwrap();
    let present: HashSet<u64> = segment_files(directory.path()).into_iter().collect();
    assert!(present.contains(&straggler.location.segment));
    assert!(
        present.contains(&fields.segment),
        "the fields' segment went before the message's"
    );
    spool.shutdown();
    drop(spool);

    let (spool, report) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let message = message_of(&report, straggler.id);
    assert_eq!(message.state, MessageState::Queued);
    assert_eq!(message.added_fields, Some(fields));
    assert_eq!(
        &*spool.added_fields(straggler.id, fields).unwrap(),
        SIGNATURE.as_bytes()
    );
    spool.reclaim().unwrap();
    assert!(segment_files(directory.path()).contains(&fields.segment));
    let sequence = spool
        .append_message_done(straggler.id, 3, DoneReason::AllRecipientsFinal)
        .unwrap();
    waiter.wait(sequence).unwrap();
    spool.reclaim().unwrap();
    let present: BTreeSet<u64> = segment_files(directory.path()).into_iter().collect();
    let open: BTreeSet<u64> = open_segment_numbers(&spool).into_iter().collect();
    assert_eq!(present, open);
}
