//! The spool's hot paths: appending a message into the mapped segment (no waiting for the
//! sync), and appending with group commit, where every thread waits for the commit notice
//! that makes its message durable, as the server does before it answers 250.
//!
//! The spool lives under `CARGO_TARGET_TMPDIR` (inside `target/`, on the repository's
//! filesystem, not a tmpfs), so syncs cost what they cost on this machine's disk. A raw
//! `fdatasync` benchmark gives the floor for group-commit latency.

#![allow(
    clippy::expect_used,
    reason = "a benchmark has no caller to hand an error to; failing loudly is right"
)]

use std::fs::File;
use std::hint::black_box;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tsubame_spool::{Envelope, Spool, SpoolOptions};

/// Appends per spool before the benchmark (outside the timed part) starts a fresh one, so
/// the disk usage of a run stays bounded (at most this many bodies plus envelopes).
const APPENDS_PER_SPOOL: u64 = 20_000;

/// Thread counts for group commit: one client, a few, and many concurrent clients.
const COMMIT_THREADS: [usize; 3] = [1, 4, 16];

/// Body size of the group-commit benchmark: a typical notification message.
const COMMIT_BODY_BYTES: usize = 1024;

/// How long a waiter tolerates no commit before the benchmark gives up.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);

fn scratch_directory() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temporary directory")
}

struct Message {
    client_address: SocketAddr,
    recipients: Vec<String>,
    body: Vec<u8>,
}

impl Message {
    fn new(body_bytes: usize) -> Self {
        Self {
            client_address: "192.0.2.10:49152".parse().expect("address"),
            recipients: vec!["operations.team@customer.example.org".to_owned()],
            body: (0..body_bytes).map(|i| b"abcdefghij\r\n"[i % 12]).collect(),
        }
    }

    fn envelope(&self) -> Envelope<'_> {
        Envelope {
            received_at_unix_ms: 1_700_000_000_000,
            client_address: self.client_address,
            helo: "mailer-07.notify.example.com",
            authenticated_user: Some("notify"),
            mail_from: "alerts+billing@notify.example.com",
            mail_parameters: "SIZE=24576 BODY=8BITMIME",
            recipients: &self.recipients,
        }
    }
}

fn open(directory: &Path) -> Spool {
    Spool::open(directory, SpoolOptions::default())
        .expect("open spool")
        .0
}

/// Append only: the cost on the event loop's thread. The committer syncs in the
/// background, as in the server.
fn append(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("spool_append");
    for body_bytes in [1024, 10 * 1024] {
        let message = Message::new(body_bytes);
        group.throughput(Throughput::Bytes(body_bytes as u64));
        group.bench_function(
            BenchmarkId::from_parameter(format!("{}KiB", body_bytes / 1024)),
            |bencher| {
                bencher.iter_custom(|iterations| {
                    let mut elapsed = Duration::ZERO;
                    let mut done = 0;
                    while done < iterations {
                        let directory = scratch_directory();
                        let spool = open(directory.path());
                        let batch = (iterations - done).min(APPENDS_PER_SPOOL);
                        let start = Instant::now();
                        for _ in 0..batch {
                            black_box(
                                spool
                                    .append_message(&message.envelope(), &message.body)
                                    .expect("append"),
                            );
                        }
                        elapsed += start.elapsed();
                        done += batch;
                        drop(spool);
                    }
                    elapsed
                });
            },
        );
    }
    group.finish();
}

/// The highest durable sequence, published by a commit subscriber.
#[derive(Default)]
struct Durable {
    through_sequence: Mutex<u64>,
    changed: Condvar,
}

impl Durable {
    fn subscribe(spool: &Spool) -> Arc<Self> {
        let durable = Arc::new(Self::default());
        let publisher = Arc::clone(&durable);
        spool.subscribe(Box::new(move |notice| {
            assert!(notice.result.is_ok(), "commit failed: {:?}", notice.result);
            *publisher.through_sequence.lock().expect("lock") = notice.through_sequence;
            publisher.changed.notify_all();
        }));
        durable
    }

    fn wait(&self, sequence: u64) {
        let mut through = self.through_sequence.lock().expect("lock");
        while *through < sequence {
            let (guard, timeout) = self
                .changed
                .wait_timeout(through, COMMIT_TIMEOUT)
                .expect("lock");
            assert!(!timeout.timed_out(), "no commit for sequence {sequence}");
            through = guard;
        }
    }
}

/// Append and wait for durability from N threads: one iteration is one message from
/// each thread, so the throughput reads in messages per second.
fn group_commit(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("spool_group_commit");
    let message = Message::new(COMMIT_BODY_BYTES);
    for threads in COMMIT_THREADS {
        group.throughput(Throughput::Elements(threads as u64));
        group.bench_function(BenchmarkId::new("threads", threads), |bencher| {
            bencher.iter_custom(|iterations| {
                let directory = scratch_directory();
                let spool = open(directory.path());
                let durable = Durable::subscribe(&spool);
                let start = Instant::now();
                std::thread::scope(|scope| {
                    for _ in 0..threads {
                        scope.spawn(|| {
                            for _ in 0..iterations {
                                let receipt = spool
                                    .append_message(&message.envelope(), &message.body)
                                    .expect("append");
                                durable.wait(receipt.sequence);
                            }
                        });
                    }
                });
                let elapsed = start.elapsed();
                drop(spool);
                elapsed
            });
        });
    }
    group.finish();
}

/// The floor under group-commit latency: one 4 KiB write into a preallocated file and an
/// `fdatasync`, on the same filesystem as the spool.
fn raw_fdatasync(criterion: &mut Criterion) {
    const FILE_BYTES: u64 = 64 * 1024 * 1024;
    const WRITE_BYTES: usize = 4096;
    let directory = scratch_directory();
    let file = File::create(directory.path().join("sync-probe")).expect("create");
    file.set_len(FILE_BYTES).expect("size");
    // Write the whole file once so that the timed writes hit allocated blocks.
    let block = vec![0x5a_u8; WRITE_BYTES];
    for offset in (0..FILE_BYTES).step_by(WRITE_BYTES) {
        file.write_all_at(&block, offset).expect("write");
    }
    file.sync_all().expect("sync");
    let mut offset = 0;
    criterion.bench_function("fdatasync/4KiB", |bencher| {
        bencher.iter(|| {
            file.write_all_at(&block, offset).expect("write");
            file.sync_data().expect("fdatasync");
            offset = (offset + WRITE_BYTES as u64) % FILE_BYTES;
        });
    });
}

/// What a delivery worker pays to get a body to send: `Spool::body`, a borrow from the
/// segment's read-only mapping with both checksums verified (no copy). Per byte, so the
/// CRC32C rate shows (crates/spool/src/bodies.rs quotes it).
fn body(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("spool_body");
    for body_bytes in [1024, 64 * 1024, 1024 * 1024] {
        let directory = scratch_directory();
        let spool = open(directory.path());
        let message = Message::new(body_bytes);
        let receipt = spool
            .append_message(&message.envelope(), &message.body)
            .expect("append");
        group.throughput(Throughput::Bytes(body_bytes as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(body_bytes),
            &receipt,
            |bencher, receipt| {
                bencher.iter(|| {
                    let body = spool.body(receipt.id, receipt.location).expect("body");
                    black_box(body.len())
                });
            },
        );
        spool.shutdown();
    }
    group.finish();
}

criterion_group!(benches, append, group_commit, raw_fdatasync, body);
criterion_main!(benches);
