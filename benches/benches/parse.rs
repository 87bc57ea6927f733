//! The SMTP protocol hot paths: parsing a transaction's command lines and receiving
//! DATA (and BDAT) content of realistic messages.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tsubame_smtp_proto::{
    BdatReceiver, BdatStatus, DataReceiver, DataStatus, next_line, parse_command,
};

/// The command lines of one transaction as a notification system sends it.
const TRANSACTION: &[(&str, &[u8])] = &[
    ("ehlo", b"EHLO mailer-07.notify.example.com"),
    (
        "mail_from_size_body",
        b"MAIL FROM:<alerts+billing@notify.example.com> SIZE=24576 BODY=8BITMIME",
    ),
    ("rcpt_to", b"RCPT TO:<operations.team@customer.example.org>"),
    ("data", b"DATA"),
];

/// RFC 5321 §4.5.3.1.4 command line limit, as the server uses it.
const MAX_COMMAND_LINE_BYTES: usize = 512;
/// RFC 5321 §4.5.3.1.6 text line limit.
const MAX_TEXT_LINE_BYTES: usize = 1000;
/// Far above every message benchmarked, so no limit is hit.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

fn commands(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("parse_command");
    for (name, line) in TRANSACTION {
        group.throughput(Throughput::Bytes(line.len() as u64));
        group.bench_function(*name, |bencher| {
            bencher.iter(|| parse_command(black_box(line)).is_ok())
        });
    }

    // The same lines pipelined in one buffer, found with next_line and parsed.
    let mut pipelined = Vec::new();
    for (_, line) in TRANSACTION {
        pipelined.extend_from_slice(line);
        pipelined.extend_from_slice(b"\r\n");
    }
    group.throughput(Throughput::Bytes(pipelined.len() as u64));
    group.bench_function("pipelined_transaction", |bencher| {
        bencher.iter(|| {
            let mut rest = black_box(pipelined.as_slice());
            let mut parsed = 0;
            while let Ok(Some(line)) = next_line(rest, MAX_COMMAND_LINE_BYTES) {
                if parse_command(rest.get(..line.content_bytes).unwrap_or_default()).is_ok() {
                    parsed += 1;
                }
                rest = rest.get(line.length_bytes..).unwrap_or_default();
            }
            parsed
        })
    });
    group.finish();
}

/// A plain-text message of about `size_bytes`, dot-stuffed for the wire: headers, then
/// lines of 20 to 77 characters, a few of them starting with a (stuffed) dot.
fn wire_message(size_bytes: usize) -> Vec<u8> {
    let mut message = b"From: Alerts <alerts@notify.example.com>\r\n\
        To: operations.team@customer.example.org\r\n\
        Subject: Daily report\r\n\
        Date: Mon, 2 Mar 2026 09:00:00 +0900\r\n\
        Message-ID: <20260302090000.1234@notify.example.com>\r\n\
        MIME-Version: 1.0\r\n\
        Content-Type: text/plain; charset=utf-8\r\n\r\n"
        .to_vec();
    let words = "the quick brown fox jumps over the lazy dog and reports status ok";
    let mut line_number = 0usize;
    while message.len() < size_bytes {
        line_number += 1;
        if line_number.is_multiple_of(40) {
            message.extend_from_slice(b"..a line that began with a dot\r\n");
            continue;
        }
        let length = 20 + (line_number * 37) % 58;
        message.extend(words.bytes().cycle().take(length));
        message.extend_from_slice(b"\r\n");
    }
    message.extend_from_slice(b".\r\n");
    message
}

const SIZES: &[(&str, usize)] = &[
    ("1KiB", 1 << 10),
    ("10KiB", 10 << 10),
    ("100KiB", 100 << 10),
];

fn data(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("data_receiver");
    for (name, size_bytes) in SIZES {
        let message = wire_message(*size_bytes);
        let mut body = Vec::with_capacity(message.len());
        group.throughput(Throughput::Bytes(message.len() as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(name),
            &message,
            |bencher, message| {
                bencher.iter(|| {
                    body.clear();
                    let mut receiver = DataReceiver::new(MAX_MESSAGE_BYTES, MAX_TEXT_LINE_BYTES);
                    let status = receiver.feed(black_box(message), &mut body);
                    assert!(matches!(status, DataStatus::Done { .. }));
                    body.len()
                })
            },
        );
    }
    group.finish();
}

fn bdat(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("bdat_receiver");
    for (name, size_bytes) in SIZES {
        let mut message = wire_message(*size_bytes);
        message.truncate(message.len() - b".\r\n".len());
        let mut body = Vec::with_capacity(message.len());
        group.throughput(Throughput::Bytes(message.len() as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(name),
            &message,
            |bencher, message| {
                bencher.iter(|| {
                    body.clear();
                    let mut receiver = BdatReceiver::new(MAX_MESSAGE_BYTES);
                    receiver.start_chunk(message.len() as u64);
                    let status = receiver.feed(black_box(message), &mut body);
                    assert!(matches!(status, BdatStatus::ChunkDone { .. }));
                    receiver.finish(&mut body);
                    body.len()
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, commands, data, bdat);
criterion_main!(benches);
