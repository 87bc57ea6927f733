//! Tests of the writer, the reader and recovery, on real files in temporary directories.

mod added_fields;
mod bodies_and_reclaim;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use proptest::prelude::*;

use crate::format::{
    self, DoneReason, OutcomeKind, RECORD_HEADER_SIZE_BYTES, RecordType, Salt, ScannedRecord,
    SegmentHeader,
};
use crate::*;

/// How long a test waits for a commit notice before it fails.
const COMMIT_WAIT: Duration = Duration::from_secs(30);

/// A small segment size so that tests cross segment boundaries quickly.
const SMALL_SEGMENT_BYTES: u64 = 4096;

fn options(segment_size_bytes: u64) -> SpoolOptions {
    SpoolOptions { segment_size_bytes }
}

struct TestEnvelope {
    client_address: SocketAddr,
    helo: String,
    authenticated_user: Option<String>,
    mail_from: String,
    mail_parameters: String,
    recipients: Vec<String>,
}

impl TestEnvelope {
    fn numbered(n: usize) -> Self {
        Self {
            client_address: if n.is_multiple_of(2) {
                "192.0.2.7:40001".parse().unwrap()
            } else {
                "[2001:db8::1]:587".parse().unwrap()
            },
            helo: format!("printer-{n}.example"),
            authenticated_user: n.is_multiple_of(3).then(|| format!("user{n}")),
            mail_from: if n.is_multiple_of(5) {
                String::new()
            } else {
                format!("sender{n}@example.com")
            },
            mail_parameters: if n.is_multiple_of(2) {
                "BODY=8BITMIME SMTPUTF8".to_owned()
            } else {
                String::new()
            },
            recipients: (0..=n % 4)
                .map(|r| format!("rcpt{r}.{n}@example.net"))
                .collect(),
        }
    }

    fn envelope(&self) -> Envelope<'_> {
        Envelope {
            received_at_unix_ms: 1_700_000_000_000,
            client_address: self.client_address,
            helo: &self.helo,
            authenticated_user: self.authenticated_user.as_deref(),
            mail_from: &self.mail_from,
            mail_parameters: &self.mail_parameters,
            recipients: &self.recipients,
        }
    }

    fn assert_matches(&self, message: &SpooledMessage) {
        assert_eq!(message.client_address, self.client_address.to_string());
        assert_eq!(message.helo, self.helo);
        assert_eq!(message.authenticated_user, self.authenticated_user);
        assert_eq!(message.mail_from, self.mail_from);
        assert_eq!(message.mail_parameters, self.mail_parameters);
        assert_eq!(message.recipients, self.recipients);
        assert_eq!(message.received_at_unix_ms, 1_700_000_000_000);
    }
}

fn body(n: usize, size_bytes: usize) -> Vec<u8> {
    (0..size_bytes).map(|i| (i * 31 + n * 7) as u8).collect()
}

/// Collects commit notices and lets a test wait until a sequence is covered.
#[derive(Clone, Default)]
struct CommitWaiter {
    notices: Arc<(Mutex<Vec<CommitNotice>>, Condvar)>,
}

impl CommitWaiter {
    fn subscribe(spool: &Spool) -> Self {
        let waiter = Self::default();
        let notices = Arc::clone(&waiter.notices);
        spool.subscribe(Box::new(move |notice| {
            notices.0.lock().unwrap().push(notice.clone());
            notices.1.notify_all();
        }));
        waiter
    }

    /// The result of the notice that covers `sequence`.
    fn wait(&self, sequence: u64) -> Result<(), Arc<str>> {
        let (lock, condvar) = &*self.notices;
        let mut notices = lock.lock().unwrap();
        loop {
            if let Some(notice) = notices.iter().find(|n| n.through_sequence >= sequence) {
                return notice.result.clone();
            }
            let (guard, timeout) = condvar.wait_timeout(notices, COMMIT_WAIT).unwrap();
            assert!(
                !timeout.timed_out(),
                "no commit notice for sequence {sequence}"
            );
            notices = guard;
        }
    }

    fn notices(&self) -> Vec<CommitNotice> {
        self.notices.0.lock().unwrap().clone()
    }
}

fn segment_path(directory: &Path, number: u64) -> PathBuf {
    directory.join(format::segment_file_name(number))
}

fn segment_files(directory: &Path) -> Vec<u64> {
    let mut numbers: Vec<u64> = std::fs::read_dir(directory)
        .unwrap()
        .filter_map(|entry| format::parse_segment_file_name(entry.unwrap().file_name().to_str()?))
        .collect();
    numbers.sort_unstable();
    numbers
}

fn flip_byte(path: &Path, offset: u64) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    byte[0] ^= 0x40;
    file.write_all_at(&byte, offset).unwrap();
}

/// Appends `count` numbered messages of `size_bytes` and waits until all are durable.
fn append_durably(
    spool: &Spool,
    waiter: &CommitWaiter,
    first: usize,
    count: usize,
    size_bytes: usize,
) -> Vec<AppendReceipt> {
    let receipts: Vec<AppendReceipt> = (first..first + count)
        .map(|n| {
            let envelope = TestEnvelope::numbered(n);
            spool
                .append_message(&envelope.envelope(), &body(n, size_bytes))
                .unwrap()
        })
        .collect();
    if let Some(last) = receipts.last() {
        waiter.wait(last.sequence).unwrap();
    }
    receipts
}

/// Checks that the scanned messages are exactly the numbered messages of `receipts`, with
/// bodies of `size_bytes`, and that `read_body` returns them.
fn assert_messages(
    directory: &Path,
    report: &ScanReport,
    receipts: &[(usize, AppendReceipt)],
    size_bytes: usize,
) {
    let sized: Vec<_> = receipts
        .iter()
        .map(|(n, receipt)| (*n, *receipt, size_bytes))
        .collect();
    assert_messages_sized(directory, report, &sized);
}

/// Like `assert_messages`, with a body size per message.
fn assert_messages_sized(
    directory: &Path,
    report: &ScanReport,
    receipts: &[(usize, AppendReceipt, usize)],
) {
    assert_eq!(report.messages.len(), receipts.len());
    assert!(
        report
            .messages
            .windows(2)
            .all(|pair| pair[0].id < pair[1].id),
        "not in id order"
    );
    for (n, receipt, size_bytes) in receipts {
        let message = report
            .messages
            .iter()
            .find(|message| message.id == receipt.id)
            .unwrap_or_else(|| panic!("message {n} ({}) missing", receipt.id));
        assert_eq!(message.location, receipt.location);
        assert_eq!(message.state, MessageState::Queued);
        assert_eq!(message.body_size_bytes, *size_bytes as u64);
        TestEnvelope::numbered(*n).assert_matches(message);
        assert_eq!(
            read_body(directory, message).unwrap(),
            body(*n, *size_bytes)
        );
    }
}

#[test]
fn append_then_scan_round_trips() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, report) = Spool::open(directory.path(), SpoolOptions::default()).unwrap();
    assert!(report.messages.is_empty());
    let waiter = CommitWaiter::subscribe(&spool);
    let receipts = append_durably(&spool, &waiter, 0, 6, 1000);
    for pair in receipts.windows(2) {
        assert!(pair[0].id < pair[1].id);
        assert_eq!(pair[0].sequence + 1, pair[1].sequence);
    }
    assert_eq!(receipts[0].sequence, 1);
    // A concurrent read-only scan sees everything that is durable.
    let live = scan(directory.path()).unwrap();
    assert_messages(
        directory.path(),
        &live,
        &receipts.iter().copied().enumerate().collect::<Vec<_>>(),
        1000,
    );
    spool.shutdown();
    let report = scan(directory.path()).unwrap();
    assert_messages(
        directory.path(),
        &report,
        &receipts.into_iter().enumerate().collect::<Vec<_>>(),
        1000,
    );
    assert!(report.quarantined.is_empty());
    assert!(report.torn_tails.is_empty());
    assert_eq!(report.segment_count, 1);
}

#[test]
fn many_appends_span_several_segments() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let receipts = append_durably(&spool, &waiter, 0, 120, 300);
    spool.shutdown();
    let report = scan(directory.path()).unwrap();
    let segments: HashSet<u64> = receipts.iter().map(|r| r.location.segment).collect();
    assert!(segments.len() >= 10, "only {} segments", segments.len());
    assert_eq!(report.segment_count, segments.len());
    assert_messages(
        directory.path(),
        &report,
        &receipts.into_iter().enumerate().collect::<Vec<_>>(),
        300,
    );
    assert!(report.quarantined.is_empty() && report.torn_tails.is_empty());
}

#[test]
fn syncs_are_timed_and_disk_usage_counts_the_segment_files() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    assert_eq!(spool.sync_latency().count, 0);
    append_durably(&spool, &waiter, 0, 40, 300);
    let latency = spool.sync_latency();
    // At least one commit covered the appends; each is one observation.
    assert!(latency.count >= 1 && latency.count <= 40, "{latency:?}");
    assert!(latency.sum_secs > 0.0, "{latency:?}");
    // A file that is not a segment is not counted.
    std::fs::write(directory.path().join("delivery.log"), vec![b'x'; 100_000]).unwrap();
    let usage = spool.disk_usage().unwrap();
    let files = segment_files(directory.path());
    assert_eq!(usage.segments, files.len() as u64);
    assert!(
        files.len() >= 3,
        "40 messages of 300 bytes fill several 4 KiB segments"
    );
    // Allocated blocks: each segment occupies at least its preallocated size.
    assert!(
        usage.bytes >= files.len() as u64 * SMALL_SEGMENT_BYTES,
        "{usage:?}"
    );
    assert!(
        usage.bytes < 100_000 + files.len() as u64 * SMALL_SEGMENT_BYTES * 2,
        "{usage:?}"
    );
    spool.shutdown();
}

#[test]
fn second_open_is_refused_while_locked() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), SpoolOptions::default()).unwrap();
    let refused = Spool::open(directory.path(), SpoolOptions::default()).unwrap_err();
    assert!(
        matches!(&refused, SpoolError::Locked { path } if path == directory.path()),
        "{refused}"
    );
    assert!(refused.to_string().contains("locked by another process"));
    drop(spool);
    Spool::open(directory.path(), SpoolOptions::default()).unwrap();
}

#[test]
fn ids_increase_across_reopen_even_past_the_clock() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), SpoolOptions::default()).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let first = append_durably(&spool, &waiter, 0, 3, 10);
    drop(spool);

    // A segment holding an id far in the future (a clock that has since gone back).
    let future_id = MessageId(writer::now_unix_us() + 3_600_000_000_000);
    write_foreign_segment(
        directory.path(),
        1000,
        Salt(7),
        &[message_record(Salt(7), future_id, 0, b"later")],
    );

    let (spool, report) = Spool::open(directory.path(), SpoolOptions::default()).unwrap();
    assert_eq!(report.messages.len(), 4);
    let waiter = CommitWaiter::subscribe(&spool);
    let second = append_durably(&spool, &waiter, 3, 3, 10);
    assert!(second[0].id > future_id);
    assert!(second[0].id > first[2].id);
    assert!(second.windows(2).all(|pair| pair[0].id < pair[1].id));
    // New records went to a new segment after every existing one.
    assert!(second.iter().all(|r| r.location.segment > 1000));
}

/// Builds a message record (header and payload, unpadded) with the given salt and id.
fn message_record(salt: Salt, id: MessageId, n: usize, body: &[u8]) -> Vec<u8> {
    let envelope = TestEnvelope::numbered(n);
    let mut payload = format::encode_message_prefix(id, &envelope.envelope(), body.len()).unwrap();
    payload.extend_from_slice(body);
    framed(salt, RecordType::Message, &payload)
}

fn framed(salt: Salt, record_type: RecordType, payload: &[u8]) -> Vec<u8> {
    let header = format::encode_record_header(
        salt,
        record_type,
        payload.len() as u32,
        salt.checksum(&[payload]),
    );
    let mut record = header.to_vec();
    record.extend_from_slice(payload);
    record.resize(format::record_size_on_disk(payload.len()).unwrap(), 0);
    record
}

fn segment_bytes(number: u64, salt: Salt, records: &[Vec<u8>], size_bytes: usize) -> Vec<u8> {
    let mut bytes = SegmentHeader::new(number, 1, salt, size_bytes as u64)
        .encode()
        .to_vec();
    for record in records {
        bytes.extend_from_slice(record);
    }
    assert!(bytes.len() <= size_bytes);
    bytes.resize(size_bytes, 0);
    bytes
}

fn write_foreign_segment(directory: &Path, number: u64, salt: Salt, records: &[Vec<u8>]) {
    std::fs::write(
        segment_path(directory, number),
        segment_bytes(number, salt, records, 8192),
    )
    .unwrap();
}

/// Writes three messages, shuts down, and returns their receipts and the segment path.
fn three_messages(directory: &Path) -> (Vec<AppendReceipt>, PathBuf) {
    let (spool, _) = Spool::open(directory, SpoolOptions::default()).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let receipts = append_durably(&spool, &waiter, 0, 3, 500);
    spool.shutdown();
    assert!(
        receipts
            .iter()
            .all(|r| r.location.segment == receipts[0].location.segment)
    );
    let path = segment_path(directory, receipts[0].location.segment);
    (receipts, path)
}

#[test]
fn torn_tail_is_reported_and_earlier_messages_survive() {
    enum Tear {
        /// The file ends in the middle of the record.
        Truncate,
        /// The record's second half never reached the disk.
        ZeroSecondHalf,
        /// Garbage over the record's last bytes.
        Garble,
        /// Only the header was written.
        HeaderOnly,
    }
    for tear in [
        Tear::Truncate,
        Tear::ZeroSecondHalf,
        Tear::Garble,
        Tear::HeaderOnly,
    ] {
        let directory = tempfile::tempdir().unwrap();
        let (receipts, path) = three_messages(directory.path());
        let last = receipts[2].location.offset_bytes;
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let record_end = last + 600;
        match tear {
            Tear::Truncate => file.set_len(last + 100).unwrap(),
            Tear::ZeroSecondHalf => file.write_all_at(&[0; 300], last + 300).unwrap(),
            Tear::Garble => file.write_all_at(&[0xa5; 64], record_end - 100).unwrap(),
            Tear::HeaderOnly => file
                .write_all_at(&[0; 560], last + RECORD_HEADER_SIZE_BYTES as u64)
                .unwrap(),
        }
        drop(file);

        let report = scan(directory.path()).unwrap();
        assert_messages(
            directory.path(),
            &report,
            &[(0, receipts[0]), (1, receipts[1])],
            500,
        );
        assert_eq!(
            report.torn_tails,
            vec![TornTail {
                segment_path: path.clone(),
                offset_bytes: last
            }]
        );
        assert!(report.quarantined.is_empty());

        let (spool, recovered) = Spool::open(directory.path(), SpoolOptions::default()).unwrap();
        assert_eq!(recovered.torn_tails.len(), 1);
        let waiter = CommitWaiter::subscribe(&spool);
        let more = append_durably(&spool, &waiter, 3, 1, 500);
        assert_ne!(more[0].location.segment, receipts[0].location.segment);
        spool.shutdown();
        let report = scan(directory.path()).unwrap();
        assert_messages(
            directory.path(),
            &report,
            &[(0, receipts[0]), (1, receipts[1]), (3, more[0])],
            500,
        );
        let copy = directory.path().join("quarantine").join(format!(
            "{:016x}-{:016x}.torn",
            receipts[0].location.segment, last
        ));
        assert!(copy.exists());
    }
}

#[test]
fn damage_in_the_middle_is_quarantined_and_the_rest_recovered() {
    // Where in record 2 the flipped byte lands, relative to its start.
    let cases: [(&str, u64, &str); 5] = [
        ("payload byte", 200, "record payload checksum mismatch"),
        (
            "last body byte",
            RECORD_HEADER_SIZE_BYTES as u64 + 560,
            "record payload checksum mismatch",
        ),
        ("payload length", 9, "record header checksum mismatch"),
        ("header checksum", 5, "record header checksum mismatch"),
        ("magic", 1, "record magic is wrong"),
    ];
    for (what, offset_in_record, reason) in cases {
        let directory = tempfile::tempdir().unwrap();
        let (receipts, path) = three_messages(directory.path());
        let second = receipts[1].location.offset_bytes;
        let size_on_disk = receipts[2].location.offset_bytes - second;
        let mut original = vec![0u8; size_on_disk as usize];
        std::fs::File::open(&path)
            .unwrap()
            .read_exact_at(&mut original, second)
            .unwrap();
        flip_byte(&path, second + offset_in_record);
        let mut damaged = original.clone();
        damaged[offset_in_record as usize] ^= 0x40;

        let report = scan(directory.path()).unwrap();
        assert_messages(
            directory.path(),
            &report,
            &[(0, receipts[0]), (2, receipts[2])],
            500,
        );
        assert_eq!(
            report.quarantined,
            vec![QuarantinedRecord {
                segment_path: path.clone(),
                offset_bytes: second,
                reason
            }],
            "{what}"
        );
        assert!(report.torn_tails.is_empty(), "{what}");

        let (spool, _) = Spool::open(directory.path(), SpoolOptions::default()).unwrap();
        let copy = directory.path().join("quarantine").join(format!(
            "{:016x}-{second:016x}.record",
            receipts[0].location.segment
        ));
        assert_eq!(std::fs::read(&copy).unwrap(), damaged, "{what}");
        drop(spool);
        // A second recovery finds the copy in place and leaves it alone.
        let (_spool, again) = Spool::open(directory.path(), SpoolOptions::default()).unwrap();
        assert_eq!(again.quarantined.len(), 1);
        assert_eq!(
            std::fs::read_dir(directory.path().join("quarantine"))
                .unwrap()
                .count(),
            1
        );
    }
}

#[test]
fn read_body_detects_a_corrupted_body() {
    let directory = tempfile::tempdir().unwrap();
    let (receipts, path) = three_messages(directory.path());
    let report = scan(directory.path()).unwrap();
    flip_byte(&path, receipts[0].location.offset_bytes + 400);
    let error = read_body(directory.path(), &report.messages[0]).unwrap_err();
    assert!(
        matches!(error, SpoolError::Corrupt { offset_bytes, reason: "record payload checksum mismatch", .. } if offset_bytes == receipts[0].location.offset_bytes),
        "{error}"
    );
    assert_eq!(
        read_body(directory.path(), &report.messages[1]).unwrap(),
        body(1, 500)
    );
    let mut missing = report.messages[1].clone();
    missing.location.segment = 999;
    assert!(matches!(
        read_body(directory.path(), &missing),
        Err(SpoolError::NotFound { .. })
    ));
}

#[test]
fn unknown_major_version_is_refused() {
    let directory = tempfile::tempdir().unwrap();
    let mut header = SegmentHeader::new(1, 1, Salt(1), 8192);
    header.format_major = 2;
    header.format_minor = 3;
    let mut bytes = header.encode().to_vec();
    bytes.resize(8192, 0);
    std::fs::write(segment_path(directory.path(), 1), bytes).unwrap();
    for error in [
        scan(directory.path()).unwrap_err(),
        Spool::open(directory.path(), SpoolOptions::default()).unwrap_err(),
    ] {
        assert!(
            matches!(
                error,
                SpoolError::UnsupportedVersion {
                    major: 2,
                    minor: 3,
                    ..
                }
            ),
            "{error}"
        );
    }
}

#[test]
fn newer_minor_version_is_read() {
    let directory = tempfile::tempdir().unwrap();
    let mut header = SegmentHeader::new(1, 1, Salt(9), 8192);
    header.format_minor = 7;
    header.header_size_bytes = 128;
    let mut bytes = header.encode().to_vec();
    bytes.resize(128, 0);
    bytes.extend_from_slice(&message_record(Salt(9), MessageId(5), 1, b"hello"));
    // A record type a later minor version added: valid checksums, unknown type.
    let mut unknown = framed(Salt(9), RecordType::Message, b"from the future");
    unknown[12..14].copy_from_slice(&77u16.to_le_bytes());
    let header_checksum = Salt(9).checksum(&[&unknown[8..RECORD_HEADER_SIZE_BYTES]]);
    unknown[4..8].copy_from_slice(&header_checksum.to_le_bytes());
    bytes.extend_from_slice(&unknown);
    bytes.resize(8192, 0);
    std::fs::write(segment_path(directory.path(), 1), bytes).unwrap();
    let report = scan(directory.path()).unwrap();
    assert_eq!(report.messages.len(), 1);
    assert_eq!(
        read_body(directory.path(), &report.messages[0]).unwrap(),
        b"hello"
    );
}

#[test]
fn commit_notices_cover_every_sequence_in_order() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(64 * 1024)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let receipts = append_durably(&spool, &waiter, 0, 300, 100);
    spool.shutdown();
    let notices = waiter.notices();
    assert!(notices.iter().all(|notice| notice.result.is_ok()));
    assert!(
        notices
            .windows(2)
            .all(|pair| pair[0].through_sequence < pair[1].through_sequence)
    );
    assert_eq!(notices.last().unwrap().through_sequence, 300);
    let sequences: Vec<u64> = receipts.iter().map(|r| r.sequence).collect();
    assert_eq!(sequences, (1..=300).collect::<Vec<_>>());
}

#[test]
fn concurrent_appends_all_become_durable() {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 150;
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(64 * 1024)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let receipts: Vec<(usize, AppendReceipt)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let spool = spool.clone();
                let waiter = waiter.clone();
                scope.spawn(move || {
                    (0..PER_THREAD)
                        .map(|i| {
                            let n = t * PER_THREAD + i;
                            let envelope = TestEnvelope::numbered(n);
                            let receipt = spool
                                .append_message(&envelope.envelope(), &body(n, 700))
                                .unwrap();
                            waiter.wait(receipt.sequence).unwrap();
                            (n, receipt)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|worker| worker.join().unwrap())
            .collect()
    });
    let ids: HashSet<MessageId> = receipts.iter().map(|(_, r)| r.id).collect();
    assert_eq!(ids.len(), THREADS * PER_THREAD);
    let sequences: HashSet<u64> = receipts.iter().map(|(_, r)| r.sequence).collect();
    assert_eq!(sequences, (1..=(THREADS * PER_THREAD) as u64).collect());
    // Group commit: fewer syncs than messages (each thread waits for its own commit, so
    // there are at most as many as messages; usually far fewer).
    assert!(waiter.notices().len() <= THREADS * PER_THREAD);
    spool.shutdown();
    let report = scan(directory.path()).unwrap();
    assert_messages(directory.path(), &report, &receipts, 700);
}

#[test]
fn record_bigger_than_a_segment_gets_its_own() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let small = append_durably(&spool, &waiter, 0, 1, 100);
    let big = append_durably(&spool, &waiter, 1, 1, 20_000);
    let after = append_durably(&spool, &waiter, 2, 1, 100);
    spool.shutdown();
    assert_ne!(big[0].location.segment, small[0].location.segment);
    assert_eq!(
        big[0].location.offset_bytes,
        format::SEGMENT_HEADER_SIZE_BYTES as u64
    );
    // The active segment was not sealed for it.
    assert_eq!(after[0].location.segment, small[0].location.segment);
    let big_file = segment_path(directory.path(), big[0].location.segment);
    assert!(std::fs::metadata(&big_file).unwrap().len() >= 20_000);
    let report = scan(directory.path()).unwrap();
    assert_messages_sized(
        directory.path(),
        &report,
        &[(0, small[0], 100), (1, big[0], 20_000), (2, after[0], 100)],
    );
    assert_eq!(report.segment_count, 2);
}

#[test]
fn disk_full_keeps_earlier_records_and_a_later_append_succeeds() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let mut accepted: Vec<(usize, AppendReceipt)> = append_durably(&spool, &waiter, 0, 3, 300)
        .into_iter()
        .enumerate()
        .collect();
    spool
        .inner
        .shared
        .fail_segment_creation
        .store(true, Ordering::Release);
    // Fill the active segment (and a spare, if one was made in time) until a new segment
    // is needed.
    let mut n = accepted.len();
    let error = loop {
        assert!(n < 100, "never ran out of room");
        let envelope = TestEnvelope::numbered(n);
        match spool.append_message(&envelope.envelope(), &body(n, 300)) {
            Ok(receipt) => accepted.push((n, receipt)),
            Err(error) => break error,
        }
        n += 1;
    };
    assert!(matches!(error, SpoolError::DiskFull), "{error}");
    assert_eq!(error.to_string(), "spool is out of disk space");
    let envelope = TestEnvelope::numbered(n);
    assert!(matches!(
        spool.append_message(&envelope.envelope(), &body(n, 300)),
        Err(SpoolError::DiskFull)
    ));
    waiter.wait(accepted.last().unwrap().1.sequence).unwrap();
    assert_messages(
        directory.path(),
        &scan(directory.path()).unwrap(),
        &accepted,
        300,
    );

    // Space returns: the next append creates a segment and succeeds.
    spool
        .inner
        .shared
        .fail_segment_creation
        .store(false, Ordering::Release);
    n += 1;
    accepted.extend(
        append_durably(&spool, &waiter, n, 1, 300)
            .into_iter()
            .map(|receipt| (n, receipt)),
    );
    spool.shutdown();
    assert_messages(
        directory.path(),
        &scan(directory.path()).unwrap(),
        &accepted,
        300,
    );
}

#[test]
fn failed_sync_is_reported_and_the_segment_sealed() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), SpoolOptions::default()).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let before = append_durably(&spool, &waiter, 0, 1, 100);
    spool
        .inner
        .shared
        .fail_next_sync
        .store(true, Ordering::Release);
    let envelope = TestEnvelope::numbered(1);
    let refused = spool
        .append_message(&envelope.envelope(), &body(1, 100))
        .unwrap();
    let error = waiter.wait(refused.sequence).unwrap_err();
    assert!(
        error.contains("msync") && error.contains("injected"),
        "{error}"
    );
    let after = append_durably(&spool, &waiter, 2, 1, 100);
    assert_eq!(refused.location.segment, before[0].location.segment);
    assert_ne!(after[0].location.segment, refused.location.segment);
}

#[test]
fn done_records_mark_messages_done() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), SpoolOptions::default()).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let receipts = append_durably(&spool, &waiter, 0, 2, 100);
    let shared = &spool.inner.shared;
    let outcome = format::encode_recipient_outcome(
        receipts[0].id,
        0,
        OutcomeKind::Delivered,
        1_700_000_000_500,
        "250 2.0.0 OK queued as 1234",
    );
    shared
        .append_journal_record(RecordType::RecipientOutcome, receipts[0].id, &outcome)
        .unwrap();
    let deferred = format::encode_recipient_outcome(
        receipts[1].id,
        0,
        OutcomeKind::Deferred,
        1_700_000_000_600,
        &"4".repeat(10_000),
    );
    shared
        .append_journal_record(RecordType::RecipientOutcome, receipts[1].id, &deferred)
        .unwrap();
    let done = format::encode_message_done(
        receipts[0].id,
        1_700_000_000_700,
        DoneReason::AllRecipientsFinal,
    );
    let (_, sequence) = shared
        .append_journal_record(RecordType::MessageDone, receipts[0].id, &done)
        .unwrap();
    waiter.wait(sequence).unwrap();
    spool.shutdown();

    let report = scan(directory.path()).unwrap();
    assert_eq!(report.messages[0].state, MessageState::Done);
    assert_eq!(report.messages[1].state, MessageState::Queued);
    let bytes =
        std::fs::read(segment_path(directory.path(), receipts[0].location.segment)).unwrap();
    let segment = scan_segment_bytes(&bytes).unwrap();
    let outcomes: Vec<_> = segment
        .records
        .iter()
        .filter_map(|record| match record {
            ScannedRecord::RecipientOutcome(outcome) => Some(outcome),
            _ => None,
        })
        .collect();
    assert_eq!(outcomes.len(), 2);
    assert_eq!(outcomes[0].message_id, receipts[0].id);
    assert_eq!(outcomes[0].kind, OutcomeKind::Delivered);
    assert_eq!(outcomes[0].reply_text, "250 2.0.0 OK queued as 1234");
    // Writers cut reply texts to the format's limit.
    assert_eq!(outcomes[1].reply_text.len(), format::MAX_REPLY_TEXT_BYTES);
    assert!(segment.records.iter().any(|record| matches!(record, ScannedRecord::MessageDone(done) if done.message_id == receipts[0].id)));
}

#[test]
fn forged_record_inside_a_body_is_not_indexed_after_damage() {
    // A body carrying a complete record, at every alignment, as an attacker could send it:
    // without the segment's salt its checksums cannot match.
    let fake = message_record(Salt(0x5eed), MessageId(42), 7, b"evil");
    let mut forged_body = Vec::new();
    for shift in 0..8 {
        forged_body.extend(std::iter::repeat_n(0u8, shift));
        forged_body.extend_from_slice(&fake);
        forged_body.extend(std::iter::repeat_n(0u8, 8 - shift));
    }
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), SpoolOptions::default()).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let envelope = TestEnvelope::numbered(0);
    let carrier = spool
        .append_message(&envelope.envelope(), &forged_body)
        .unwrap();
    let after = append_durably(&spool, &waiter, 1, 1, 100);
    spool.shutdown();
    // Break the carrier's magic so that recovery must scan forward through its body.
    flip_byte(
        &segment_path(directory.path(), carrier.location.segment),
        carrier.location.offset_bytes,
    );
    let report = scan(directory.path()).unwrap();
    assert_messages(directory.path(), &report, &[(1, after[0])], 100);
    assert_eq!(report.quarantined.len(), 1);
    assert_eq!(
        report.quarantined[0].offset_bytes,
        carrier.location.offset_bytes
    );
}

#[test]
fn shutdown_publishes_the_final_commit_and_refuses_appends() {
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), SpoolOptions::default()).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let receipts: Vec<AppendReceipt> = (0..5)
        .map(|n| {
            spool
                .append_message(&TestEnvelope::numbered(n).envelope(), &body(n, 50))
                .unwrap()
        })
        .collect();
    spool.shutdown();
    let last = waiter.notices().last().cloned().unwrap();
    assert_eq!(last.through_sequence, receipts[4].sequence);
    assert!(last.result.is_ok());
    let refused = spool
        .append_message(&TestEnvelope::numbered(9).envelope(), b"late")
        .unwrap_err();
    assert!(
        matches!(&refused, SpoolError::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe),
        "{refused}"
    );
    spool.shutdown(); // a second shutdown is harmless
    assert_eq!(
        segment_files(directory.path()),
        vec![receipts[0].location.segment]
    );
}

#[test]
fn open_and_shutdown_without_appends_leaves_no_segment() {
    let directory = tempfile::tempdir().unwrap();
    let nested = directory.path().join("a").join("spool");
    let (spool, _) = Spool::open(&nested, SpoolOptions::default()).unwrap();
    assert_eq!(segment_files(&nested).len(), 1);
    drop(spool);
    assert!(segment_files(&nested).is_empty());
    assert_eq!(scan(&nested).unwrap().segment_count, 0);
}

#[test]
fn leftover_temporary_segment_is_removed_and_numbers_move_past_it() {
    let directory = tempfile::tempdir().unwrap();
    let temporary = directory
        .path()
        .join(format!("{}.tmp", format::segment_file_name(40)));
    std::fs::write(&temporary, [0u8; 100]).unwrap();
    let (spool, report) = Spool::open(directory.path(), SpoolOptions::default()).unwrap();
    assert_eq!(report.segment_count, 0);
    assert!(!temporary.exists());
    let waiter = CommitWaiter::subscribe(&spool);
    let receipts = append_durably(&spool, &waiter, 0, 1, 10);
    assert_eq!(receipts[0].location.segment, 41);
}

#[test]
fn damaged_segment_header_skips_the_segment_only() {
    let directory = tempfile::tempdir().unwrap();
    let (receipts, path) = three_messages(directory.path());
    write_foreign_segment(
        directory.path(),
        500,
        Salt(3),
        &[message_record(Salt(3), MessageId(1), 4, b"x")],
    );
    flip_byte(&segment_path(directory.path(), 500), 20);
    let report = scan(directory.path()).unwrap();
    assert_messages(
        directory.path(),
        &report,
        &receipts.into_iter().enumerate().collect::<Vec<_>>(),
        500,
    );
    assert_eq!(
        report.quarantined,
        vec![QuarantinedRecord {
            segment_path: segment_path(directory.path(), 500),
            offset_bytes: 0,
            reason: "segment header checksum mismatch",
        }]
    );
    assert_eq!(report.segment_count, 2);
    assert!(path.exists());
}

#[test]
fn invalid_segment_size_is_refused() {
    let directory = tempfile::tempdir().unwrap();
    for size in [0, MIN_SEGMENT_SIZE_BYTES - 1, MAX_SEGMENT_SIZE_BYTES + 1] {
        let error = Spool::open(directory.path(), options(size)).unwrap_err();
        assert!(error.to_string().contains("segment_size_bytes"), "{error}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_message_sizes_round_trip(sizes in prop::collection::vec(0usize..12_000, 1..24)) {
        let directory = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(directory.path(), options(8192)).unwrap();
        let waiter = CommitWaiter::subscribe(&spool);
        let receipts: Vec<(usize, AppendReceipt, usize)> = sizes
            .iter()
            .enumerate()
            .map(|(n, &size)| {
                let envelope = TestEnvelope::numbered(n);
                (n, spool.append_message(&envelope.envelope(), &body(n, size)).unwrap(), size)
            })
            .collect();
        waiter.wait(receipts.last().unwrap().1.sequence).unwrap();
        spool.shutdown();
        let report = scan(directory.path()).unwrap();
        assert_messages_sized(directory.path(), &report, &receipts);
        prop_assert!(report.quarantined.is_empty() && report.torn_tails.is_empty());
    }
}

/// Runs only as root (`cargo test -p tsubame-spool -- --ignored`): mounts a 1 MiB tmpfs,
/// fills it, and checks that the spool reports `DiskFull` from a real ENOSPC and recovers
/// once space is freed.
#[test]
#[ignore = "needs root: mounts a small tmpfs"]
fn disk_full_on_a_real_small_filesystem() {
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let mount_point = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=1m,mode=0700",
            "tsubame-spool-test",
        ])
        .arg(mount_point.path())
        .status()
        .unwrap();
    assert!(status.success(), "mount failed (not root?)");
    let _unmount = Unmount(mount_point.path().to_owned());
    let filler = mount_point.path().join("filler");
    std::fs::write(&filler, vec![1u8; 600 * 1024]).unwrap();
    let directory = mount_point.path().join("spool");
    let (spool, _) = Spool::open(&directory, options(256 * 1024)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let mut accepted = Vec::new();
    let mut n = 0;
    let error = loop {
        assert!(n < 1000, "never ran out of space");
        match spool.append_message(&TestEnvelope::numbered(n).envelope(), &body(n, 10_000)) {
            Ok(receipt) => accepted.push((n, receipt)),
            Err(error) => break error,
        }
        n += 1;
    };
    assert!(matches!(error, SpoolError::DiskFull), "{error}");
    waiter.wait(accepted.last().unwrap().1.sequence).unwrap();
    std::fs::remove_file(&filler).unwrap();
    n += 1;
    accepted.extend(
        append_durably(&spool, &waiter, n, 1, 10_000)
            .into_iter()
            .map(|receipt| (n, receipt)),
    );
    spool.shutdown();
    assert_messages(&directory, &scan(&directory).unwrap(), &accepted, 10_000);
}

/// Regenerates the fuzz seed corpus from segments this crate writes. From the repository
/// root: `TSUBAME_SPOOL_SEED_DIR=$PWD/fuzz/corpus/spool_reader cargo test -p tsubame-spool
/// -- --ignored write_fuzz_seed_corpus`. The zero tail after the last record is cut to
/// keep the seeds small (a shorter file is still a valid segment to the reader).
#[test]
#[ignore = "writes the fuzz seed corpus; run by hand"]
fn write_fuzz_seed_corpus() {
    let Some(target) = std::env::var_os("TSUBAME_SPOOL_SEED_DIR").map(PathBuf::from) else {
        return;
    };
    std::fs::create_dir_all(&target).unwrap();
    let directory = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    let waiter = CommitWaiter::subscribe(&spool);
    let messages = append_durably(&spool, &waiter, 0, 3, 40);
    // Journal records go to the next segment, which starts out empty.
    spool
        .inner
        .shared
        .fail_next_sync
        .store(true, Ordering::Release);
    let sealing = append_durably_unchecked(&spool, &waiter, 3);
    let shared = &spool.inner.shared;
    let outcome = format::encode_recipient_outcome(
        messages[0].id,
        0,
        OutcomeKind::Delivered,
        1_700_000_000_500,
        "250 2.0.0 OK",
    );
    shared
        .append_journal_record(RecordType::RecipientOutcome, messages[0].id, &outcome)
        .unwrap();
    let failed = format::encode_recipient_outcome(
        messages[1].id,
        1,
        OutcomeKind::Failed,
        1_700_000_000_600,
        "550 5.1.1 no such user",
    );
    shared
        .append_journal_record(RecordType::RecipientOutcome, messages[1].id, &failed)
        .unwrap();
    let added = format::encode_added_fields(
        messages[1].id,
        1_700_000_000_650,
        "DKIM-Signature: v=1; a=ed25519-sha256; d=example.com;\r\n\tb=c2ln\r\n",
    )
    .unwrap();
    shared
        .append_journal_record(RecordType::AddedFields, messages[1].id, &added)
        .unwrap();
    let done = format::encode_message_done(
        messages[0].id,
        1_700_000_000_700,
        DoneReason::AllRecipientsFinal,
    );
    let (journal, sequence) = shared
        .append_journal_record(RecordType::MessageDone, messages[0].id, &done)
        .unwrap();
    waiter.wait(sequence).unwrap();
    spool.shutdown();
    assert_ne!(journal.segment, sealing.location.segment);

    let trimmed = |number: u64| {
        let mut bytes = std::fs::read(segment_path(directory.path(), number)).unwrap();
        let end = bytes.iter().rposition(|&byte| byte != 0).unwrap_or(0) + 1;
        bytes.truncate(format::align_record_size(end).unwrap() + 64);
        bytes
    };
    let messages_segment = trimmed(messages[0].location.segment);
    std::fs::write(target.join("messages.segment"), &messages_segment).unwrap();
    std::fs::write(target.join("journal.segment"), trimmed(journal.segment)).unwrap();
    // Damage in the middle and a torn tail.
    let mut damaged = messages_segment.clone();
    damaged[messages[1].location.offset_bytes as usize + 100] ^= 0x40;
    damaged.truncate(messages[2].location.offset_bytes as usize + 50);
    std::fs::write(target.join("damaged.segment"), damaged).unwrap();
}

/// Appends message `n` and waits for its notice, whatever the result.
fn append_durably_unchecked(spool: &Spool, waiter: &CommitWaiter, n: usize) -> AppendReceipt {
    let receipt = spool
        .append_message(&TestEnvelope::numbered(n).envelope(), &body(n, 40))
        .unwrap();
    let _ = waiter.wait(receipt.sequence);
    receipt
}

#[test]
fn journal_records_fold_into_recipient_states_across_reopen() {
    use crate::format::{DoneReason, OutcomeKind};
    let directory = tempfile::tempdir().unwrap();
    let receipts;
    {
        let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
        let waiter = CommitWaiter::subscribe(&spool);
        // Message 3 has four recipients, message 7 four as well (n % 4 + 1).
        receipts = [3, 7].map(|n| {
            let envelope = TestEnvelope::numbered(n);
            spool
                .append_message(&envelope.envelope(), &body(n, 100))
                .unwrap()
        });
        let (first, second) = (receipts[0].id, receipts[1].id);
        let journal = [
            spool
                .append_recipient_outcome(first, 0, OutcomeKind::Deferred, 10, "451 4.3.0 later")
                .unwrap(),
            spool
                .append_recipient_outcome(first, 0, OutcomeKind::Delivered, 20, "250 ok")
                .unwrap(),
            spool
                .append_recipient_outcome(
                    first,
                    1,
                    OutcomeKind::Failed,
                    30,
                    "550 5.1.1 no such user",
                )
                .unwrap(),
            // Nothing should follow a final outcome; if something does, the latest final
            // one counts (spool-format/README.md).
            spool
                .append_recipient_outcome(first, 1, OutcomeKind::Delivered, 40, "250 ok")
                .unwrap(),
            spool
                .append_recipient_outcome(first, 2, OutcomeKind::Deferred, 50, "timeout")
                .unwrap(),
            // Out of range: ignored.
            spool
                .append_recipient_outcome(first, 99, OutcomeKind::Delivered, 60, "")
                .unwrap(),
            spool
                .append_message_done(second, 70, DoneReason::Deleted)
                .unwrap(),
        ];
        waiter.wait(*journal.iter().max().unwrap()).unwrap();
        spool.shutdown();
    }
    for _reopen in 0..2 {
        let report = scan(directory.path()).unwrap();
        let first = report
            .messages
            .iter()
            .find(|m| m.id == receipts[0].id)
            .unwrap();
        let states: Vec<(Option<OutcomeKind>, u32, Option<u64>)> = first
            .recipient_states
            .iter()
            .map(|state| {
                (
                    state.final_outcome,
                    state.attempts,
                    state.last_attempt_unix_ms,
                )
            })
            .collect();
        assert_eq!(
            states,
            [
                (Some(OutcomeKind::Delivered), 2, Some(20)),
                (Some(OutcomeKind::Delivered), 2, Some(40)),
                (None, 1, Some(50)),
                (None, 0, None),
            ]
        );
        assert_eq!(first.state, MessageState::Queued);
        let second = report
            .messages
            .iter()
            .find(|m| m.id == receipts[1].id)
            .unwrap();
        assert_eq!(second.state, MessageState::Done);
        assert!(
            second
                .recipient_states
                .iter()
                .all(|state| *state == RecipientState::default())
        );
        // Reopening for writing recovers the same view.
        let (spool, recovered) =
            Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
        assert_eq!(recovered.messages, report.messages);
        spool.shutdown();
    }
}

#[test]
fn new_ids_stay_above_ids_named_only_by_journal_records() {
    use crate::format::{DoneReason, OutcomeKind};
    let directory = tempfile::tempdir().unwrap();
    // Ids far in the future, as if the clock had stepped back since they were written.
    let done_id = MessageId(u64::MAX / 2);
    let outcome_id = MessageId(u64::MAX / 2 + 7);
    {
        let (spool, _) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
        let waiter = CommitWaiter::subscribe(&spool);
        spool
            .append_message_done(done_id, 1, DoneReason::AllRecipientsFinal)
            .unwrap();
        let last = spool
            .append_recipient_outcome(outcome_id, 0, OutcomeKind::Delivered, 2, "250 ok")
            .unwrap();
        waiter.wait(last).unwrap();
        spool.shutdown();
    }
    let (spool, report) = Spool::open(directory.path(), options(SMALL_SEGMENT_BYTES)).unwrap();
    assert!(report.messages.is_empty());
    let envelope = TestEnvelope::numbered(1);
    let receipt = spool
        .append_message(&envelope.envelope(), &body(1, 10))
        .unwrap();
    assert!(
        receipt.id > outcome_id,
        "{} reuses the journal's id space",
        receipt.id
    );
    spool.shutdown();
}
