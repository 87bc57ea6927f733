//! DKIM signing with `tsubame_dkim::Signer` (relaxed/relaxed, the default header list):
//! RSA-2048 and Ed25519 over realistic messages of 1, 10 and 100 KiB, per byte
//! (`dkim_sign`), and per message at 1 KiB (`dkim_sign_message`), the figure
//! `benches/scripts/dkim-sign-vs-openssl.sh` sets beside `openssl speed`. The bare ring
//! signature over a SHA-256 digest (`dkim_sign_primitive`) splits the difference into
//! what the crypto library costs and what the DKIM work around it costs.
//!
//! The keys are made when the bench starts: Ed25519 by ring, RSA by `openssl genpkey`
//! (`openssl` must be on PATH).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, RSA_PKCS1_SHA256, RsaKeyPair};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject as _;
use tsubame_dkim::{SignedHeaders, Signer, SignerKey, SigningKey};

/// Message sizes, headers included.
const SIZES: &[(&str, usize)] = &[
    ("1KiB", 1 << 10),
    ("10KiB", 10 << 10),
    ("100KiB", 100 << 10),
];

/// The size of the per-message group's message.
const PER_MESSAGE_BYTES: usize = 1 << 10;

/// RFC 5322 §2.1.1: lines of at most 78 characters, as mail user agents wrap text.
const BODY_LINE_CHARACTERS: usize = 72;

/// A notification as an application sends it: the headers the default list signs, then
/// a text body wrapped at [`BODY_LINE_CHARACTERS`] with a blank line between paragraphs,
/// `size_bytes` and at most a line more in all. CRLF line ends, as the relay stores messages.
fn message(size_bytes: usize) -> Vec<u8> {
    let mut message = b"From: Billing <billing@notify.example.com>\r\n\
        To: customer.account@example.org\r\n\
        Subject: Your invoice for March 2026 is ready\r\n\
        Date: Tue, 3 Mar 2026 08:15:00 +0900\r\n\
        Message-ID: <invoice.20260303081500.98765@notify.example.com>\r\n\
        MIME-Version: 1.0\r\n\
        Content-Type: text/plain; charset=utf-8\r\n\
        \r\n"
        .to_vec();
    let sentence = "Your invoice number 2026-03-98765 is attached; the amount will be \
                    charged to the card ending in 4242 on the first business day. ";
    let mut words = sentence.split(' ').filter(|word| !word.is_empty()).cycle();
    let mut line = String::new();
    let mut lines_in_paragraph = 0;
    while message.len() < size_bytes {
        let word = words.next().unwrap_or("ok");
        if line.len() + word.len() + 1 > BODY_LINE_CHARACTERS {
            message.extend_from_slice(line.as_bytes());
            message.extend_from_slice(b"\r\n");
            line.clear();
            lines_in_paragraph += 1;
            if lines_in_paragraph == 6 {
                message.extend_from_slice(b"\r\n");
                lines_in_paragraph = 0;
            }
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    message.extend_from_slice(line.as_bytes());
    message.extend_from_slice(b"\r\n");
    message
}

fn signer(selector: &str, pem: &[u8]) -> Signer {
    let key = SigningKey::from_pem(pem, "bench key").unwrap_or_else(|error| panic!("{error}"));
    Signer::new(
        "notify.example.com",
        vec![SignerKey {
            selector: selector.to_string(),
            key,
        }],
        &SignedHeaders::default(),
    )
    .unwrap_or_else(|error| panic!("{error}"))
}

/// The PKCS#8 PEM keys (both generators write PKCS#8): RSA-2048, then Ed25519.
fn keys() -> (Vec<u8>, Vec<u8>) {
    let rsa = tsubame_dkim::generate_rsa_pem(2048)
        .unwrap_or_else(|error| panic!("RSA key (needs openssl on PATH): {error}"));
    let ed25519 = tsubame_dkim::generate_ed25519_pem().unwrap_or_else(|error| panic!("{error}"));
    (rsa, ed25519)
}

fn pkcs8_der(pem: &[u8]) -> PrivatePkcs8KeyDer<'static> {
    PrivatePkcs8KeyDer::from_pem_slice(pem).unwrap_or_else(|error| panic!("PKCS#8 PEM: {error}"))
}

fn sign(signer: &Signer, message: &[u8]) -> usize {
    signer
        .sign(black_box(message))
        .unwrap_or_else(|error| panic!("{error}"))
        .len()
}

fn dkim_sign(criterion: &mut Criterion) {
    let (rsa_pem, ed25519_pem) = keys();
    let signers = [
        ("rsa2048", signer("rsa2026", &rsa_pem)),
        ("ed25519", signer("ed2026", &ed25519_pem)),
    ];
    let mut group = criterion.benchmark_group("dkim_sign");
    for (algorithm, signer) in &signers {
        for (size_name, size_bytes) in SIZES {
            let message = message(*size_bytes);
            group.throughput(Throughput::Bytes(message.len() as u64));
            group.bench_with_input(
                BenchmarkId::new(*algorithm, size_name),
                &message,
                |bencher, message| bencher.iter(|| sign(signer, message)),
            );
        }
    }
    group.finish();

    let mut group = criterion.benchmark_group("dkim_sign_message");
    group.throughput(Throughput::Elements(1));
    let message = message(PER_MESSAGE_BYTES);
    for (algorithm, signer) in &signers {
        group.bench_function(*algorithm, |bencher| {
            bencher.iter(|| sign(signer, &message))
        });
    }
    group.finish();

    // What a DKIM signer signs is about 300 bytes of canonicalised header fields;
    // ring hashes it and signs the digest (RSA) or the bytes (Ed25519).
    let signed_fields = [b'h'; 300];
    let mut group = criterion.benchmark_group("dkim_sign_primitive");
    group.throughput(Throughput::Elements(1));
    let random = SystemRandom::new();
    let rsa = RsaKeyPair::from_pkcs8(pkcs8_der(&rsa_pem).secret_pkcs8_der())
        .unwrap_or_else(|error| panic!("ring RSA key: {error}"));
    let mut signature = vec![0; rsa.public().modulus_len()];
    group.bench_function("rsa2048", |bencher| {
        bencher.iter(|| {
            rsa.sign(
                &RSA_PKCS1_SHA256,
                &random,
                black_box(&signed_fields),
                &mut signature,
            )
            .unwrap_or_else(|error| panic!("ring RSA sign: {error}"))
        })
    });
    let ed25519 = Ed25519KeyPair::from_pkcs8(pkcs8_der(&ed25519_pem).secret_pkcs8_der())
        .unwrap_or_else(|error| panic!("ring Ed25519 key: {error}"));
    group.bench_function("ed25519", |bencher| {
        bencher.iter(|| ed25519.sign(black_box(&signed_fields)))
    });
    group.finish();
}

criterion_group!(benches, dkim_sign);
criterion_main!(benches);
