//! The delivery client's hot paths: parsing upstream replies and dot-stuffing a body for
//! DATA (the pieces a vectored write sends, without copying the body).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tsubame_delivery::{DotStuffed, parse_reply};

/// Replies an upstream sends in one pipelined transaction, and a typical EHLO reply.
const REPLIES: &[(&str, &[u8])] = &[
    ("single_line", b"250 2.1.0 Sender ok\r\n"),
    (
        "ehlo_multiline",
        b"250-smtp.example.net at your service\r\n250-SIZE 35882577\r\n250-8BITMIME\r\n\
          250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250-PIPELINING\r\n250-CHUNKING\r\n\
          250 SMTPUTF8\r\n",
    ),
];

fn replies(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("parse_reply");
    for (name, reply) in REPLIES {
        group.throughput(Throughput::Bytes(reply.len() as u64));
        group.bench_function(*name, |bencher| {
            bencher
                .iter(|| parse_reply(black_box(reply)).map(|parsed| parsed.map(|(_, used)| used)))
        });
    }
    group.finish();
}

/// A body of `size_bytes` made of 76-character lines, one in ten starting with a dot.
fn body(size_bytes: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(size_bytes + 80);
    let mut line = 0usize;
    while body.len() < size_bytes {
        if line.is_multiple_of(10) {
            body.push(b'.');
        }
        body.extend_from_slice(
            b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n",
        );
        line += 1;
    }
    body
}

fn dot_stuffing(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("dot_stuff");
    for size_bytes in [1024usize, 10 * 1024, 100 * 1024] {
        let body = body(size_bytes);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(size_bytes),
            &body,
            |bencher, body| {
                bencher.iter(|| {
                    DotStuffed::new(black_box(body))
                        .map(<[u8]>::len)
                        .sum::<usize>()
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, replies, dot_stuffing);
criterion_main!(benches);
