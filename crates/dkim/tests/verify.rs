//! Signatures made by `Signer` verified by two verifiers we did not write: mail-auth's
//! own (fed the published TXT record through its resolver cache) and dkimpy (fed it
//! through `dnsfunc`, in `dkimpy_verify.py`). Each case also changes a byte after
//! signing and expects both verifiers to fail, so a verifier that passes everything
//! would make these tests fail.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] functions, too

use std::sync::OnceLock;

use tsubame_dkim::{
    Algorithm, SignedHeaders, Signer, SignerKey, SigningKey, generate_ed25519_pem, generate_rsa_pem,
};
use tsubame_tests::dkim::{dkimpy_verifies, mail_auth_verifies};

const DOMAIN: &str = "example.com";
const RSA_SELECTOR: &str = "rsa2026";
const ED25519_SELECTOR: &str = "ed2026";

fn rsa_pem() -> &'static [u8] {
    static PEM: OnceLock<Vec<u8>> = OnceLock::new();
    PEM.get_or_init(|| generate_rsa_pem(2048).expect("openssl genpkey (install openssl)"))
}

fn ed25519_pem() -> &'static [u8] {
    static PEM: OnceLock<Vec<u8>> = OnceLock::new();
    PEM.get_or_init(|| generate_ed25519_pem().unwrap())
}

#[derive(Debug, Clone, Copy)]
enum Keys {
    Rsa,
    Ed25519,
    Dual,
}

/// The signer and the published records (DNS name, TXT value) for a key set.
fn signer(keys: Keys, headers: &SignedHeaders) -> (Signer, Vec<(String, String)>) {
    let mut entries = Vec::new();
    if matches!(keys, Keys::Rsa | Keys::Dual) {
        let key = SigningKey::from_pem(rsa_pem(), "rsa test key").unwrap();
        assert_eq!(key.algorithm(), Algorithm::RsaSha256);
        entries.push(SignerKey {
            selector: RSA_SELECTOR.to_string(),
            key,
        });
    }
    if matches!(keys, Keys::Ed25519 | Keys::Dual) {
        let key = SigningKey::from_pem(ed25519_pem(), "ed25519 test key").unwrap();
        entries.push(SignerKey {
            selector: ED25519_SELECTOR.to_string(),
            key,
        });
    }
    let records = entries
        .iter()
        .map(|entry| {
            (
                format!("{}._domainkey.{DOMAIN}.", entry.selector),
                entry.key.dns_txt_value(),
            )
        })
        .collect();
    (Signer::new(DOMAIN, entries, headers).unwrap(), records)
}

fn sign(signer: &Signer, message: &[u8]) -> Vec<u8> {
    let mut signed = signer.sign(message).unwrap();
    assert!(signed.starts_with(b"DKIM-Signature:"));
    assert!(signed.ends_with(b"\r\n"));
    signed.extend_from_slice(message);
    signed
}

fn message_plain() -> Vec<u8> {
    b"From: Alice <alice@example.com>\r\n\
      To: bob@example.net\r\n\
      Subject: Quarterly report\r\n\
      Date: Mon, 6 Apr 2026 09:00:00 +0000\r\n\
      Message-ID: <1@example.com>\r\n\
      MIME-Version: 1.0\r\n\
      Content-Type: text/plain; charset=us-ascii\r\n\
      \r\n\
      Hello Bob,\r\n\
      \r\n\
      the report is attached.  Two  spaces   here.\r\n\
      \r\n\
      \r\n"
        .to_vec()
}

fn message_8bit() -> Vec<u8> {
    let mut message = b"From: =?UTF-8?Q?J=C3=BCrgen?= <juergen@example.com>\r\n\
      To: bob@example.net\r\n\
      Subject: 8bit\r\n\
      MIME-Version: 1.0\r\n\
      Content-Type: text/plain; charset=utf-8\r\n\
      Content-Transfer-Encoding: 8bit\r\n\
      \r\n"
        .to_vec();
    message.extend_from_slice("Grüße aus Köln, 東京から、ça va ? \u{1F985}\r\n".as_bytes());
    message.extend_from_slice(&[0xff, 0xfe, 0x80, b'\r', b'\n']);
    message
}

fn message_long_folded_headers() -> Vec<u8> {
    let mut message =
        b"From: \"A display name long enough to fold\"\r\n <alice@example.com>\r\n".to_vec();
    message.extend_from_slice(b"To: ");
    for n in 0..60 {
        message.extend_from_slice(format!("user{n}@example.net,\r\n\t").as_bytes());
    }
    message.extend_from_slice(b"last@example.net\r\n");
    message.extend_from_slice(b"Subject:");
    for n in 0..40 {
        message.extend_from_slice(format!(" word{n}  with   odd\tspacing\r\n").as_bytes());
    }
    message.extend_from_slice(b" end\r\nX-Long: ");
    message.extend_from_slice(&[b'x'; 900]);
    message.extend_from_slice(b"\r\n\r\nbody\r\n");
    message
}

fn message_empty_body() -> Vec<u8> {
    b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: empty\r\n\r\n".to_vec()
}

fn messages() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("plain", message_plain()),
        ("8-bit body", message_8bit()),
        ("long folded headers", message_long_folded_headers()),
        ("empty body", message_empty_body()),
    ]
}

/// Changes one byte of the Subject value after signing.
fn tamper_subject(signed: &[u8]) -> Vec<u8> {
    let mut tampered = signed.to_vec();
    let at = find(&tampered, b"\nSubject:").unwrap() + b"\nSubject: ".len();
    tampered[at] ^= 0x01;
    tampered
}

/// Changes one byte of the body after signing (the last body byte before its CRLF).
fn tamper_body(signed: &[u8]) -> Option<Vec<u8>> {
    let body_start = find(signed, b"\r\n\r\n")? + 4;
    if signed.len() <= body_start + 2 {
        return None;
    }
    let mut tampered = signed.to_vec();
    let at = tampered.len() - 3;
    tampered[at] ^= 0x20;
    Some(tampered)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn check_key_set(keys: Keys) {
    let (signer, records) = signer(keys, &SignedHeaders::default());
    for (name, message) in messages() {
        let signed = sign(&signer, &message);
        let signatures = signed
            .split(|&byte| byte == b'\n')
            .filter(|line| line.starts_with(b"DKIM-Signature:"))
            .count();
        assert_eq!(
            signatures,
            if matches!(keys, Keys::Dual) { 2 } else { 1 },
            "{keys:?} {name}"
        );
        assert!(
            mail_auth_verifies(&signed, &records),
            "mail-auth: {keys:?} {name}"
        );
        assert!(
            dkimpy_verifies(&signed, &records),
            "dkimpy: {keys:?} {name}"
        );

        let tampered = tamper_subject(&signed);
        assert!(
            !mail_auth_verifies(&tampered, &records),
            "mail-auth, subject changed: {keys:?} {name}"
        );
        assert!(
            !dkimpy_verifies(&tampered, &records),
            "dkimpy, subject changed: {keys:?} {name}"
        );
        if let Some(tampered) = tamper_body(&signed) {
            assert!(
                !mail_auth_verifies(&tampered, &records),
                "mail-auth, body changed: {keys:?} {name}"
            );
            assert!(
                !dkimpy_verifies(&tampered, &records),
                "dkimpy, body changed: {keys:?} {name}"
            );
        }
    }
}

#[test]
fn rsa_signatures_verify_and_break_when_changed() {
    check_key_set(Keys::Rsa);
}

#[test]
fn ed25519_signatures_verify_and_break_when_changed() {
    check_key_set(Keys::Ed25519);
}

#[test]
fn dual_signatures_verify_and_break_when_changed() {
    check_key_set(Keys::Dual);
}

#[test]
fn relaxed_canonicalisation_survives_whitespace_changes_in_transit() {
    // What relaxed/relaxed is for: a hop that refolds headers or trims trailing space.
    let (signer, records) = signer(Keys::Ed25519, &SignedHeaders::default());
    let signed = sign(&signer, &message_plain());
    assert!(find(&signed, b"c=relaxed/relaxed").is_some());
    let mut rewritten = String::from_utf8(signed).unwrap();
    rewritten = rewritten.replace(
        "Subject: Quarterly report",
        "Subject:   Quarterly\r\n  report",
    );
    rewritten = rewritten.replace("attached.  Two", "attached.  Two  \t");
    assert!(mail_auth_verifies(rewritten.as_bytes(), &records));
    assert!(dkimpy_verifies(rewritten.as_bytes(), &records));
}

#[test]
fn simple_canonicalisation_verifies_and_breaks_on_any_whitespace_change() {
    let key = SigningKey::from_pem(ed25519_pem(), "ed25519 test key").unwrap();
    let record = (
        format!("{ED25519_SELECTOR}._domainkey.{DOMAIN}."),
        key.dns_txt_value(),
    );
    let entries = vec![SignerKey {
        selector: ED25519_SELECTOR.to_string(),
        key,
    }];
    let signer = Signer::with_canonicalization(
        DOMAIN,
        entries,
        &SignedHeaders::default(),
        "simple/simple".parse().unwrap(),
    )
    .unwrap();
    let records = vec![record];
    let signed = sign(&signer, &message_plain());
    assert!(find(&signed, b"c=simple/simple").is_some());
    assert!(mail_auth_verifies(&signed, &records));
    assert!(dkimpy_verifies(&signed, &records));
    let refolded = String::from_utf8(signed)
        .unwrap()
        .replace("Subject: Quarterly report", "Subject:  Quarterly report");
    assert!(!mail_auth_verifies(refolded.as_bytes(), &records));
    assert!(!dkimpy_verifies(refolded.as_bytes(), &records));
}

#[test]
fn over_signing_breaks_when_a_second_subject_is_added() {
    // A second Subject above the first: verifiers take the bottom-most instance first
    // (RFC 6376 section 5.4.2), so without over-signing the signature still passes while
    // many readers show the added one. (Subject rather than From: dkimpy rejects any
    // message with two From fields, signed over or not.)
    let over_signed = SignedHeaders::default_with_over_sign(true);
    for (headers, survives) in [(SignedHeaders::default(), true), (over_signed, false)] {
        let (signer, records) = signer(Keys::Dual, &headers);
        let signed = sign(&signer, &message_plain());
        let position = find(&signed, b"From: Alice").unwrap();
        let mut added = signed[..position].to_vec();
        added.extend_from_slice(b"Subject: Urgent: wire the money today\r\n");
        added.extend_from_slice(&signed[position..]);
        assert!(mail_auth_verifies(&signed, &records));
        assert!(dkimpy_verifies(&signed, &records));
        let label = if survives { "without" } else { "with" };
        assert_eq!(
            mail_auth_verifies(&added, &records),
            survives,
            "mail-auth, {label} over-signing"
        );
        assert_eq!(
            dkimpy_verifies(&added, &records),
            survives,
            "dkimpy, {label} over-signing"
        );
    }
}

#[test]
fn a_second_from_fails_when_over_signed() {
    let (signer, records) = signer(Keys::Rsa, &SignedHeaders::default_with_over_sign(true));
    let signed = sign(&signer, &message_plain());
    let position = find(&signed, b"From: Alice").unwrap();
    let mut added = signed[..position].to_vec();
    added.extend_from_slice(b"From: mallory@attacker.example\r\n");
    added.extend_from_slice(&signed[position..]);
    assert!(!mail_auth_verifies(&added, &records));
    assert!(!dkimpy_verifies(&added, &records));
}

#[test]
fn a_wrong_public_key_fails_verification() {
    let (signer, _) = signer(Keys::Ed25519, &SignedHeaders::default());
    let signed = sign(&signer, &message_plain());
    let other = SigningKey::from_pem(&generate_ed25519_pem().unwrap(), "other").unwrap();
    let records = vec![(
        format!("{ED25519_SELECTOR}._domainkey.{DOMAIN}."),
        other.dns_txt_value(),
    )];
    assert!(!mail_auth_verifies(&signed, &records));
    assert!(!dkimpy_verifies(&signed, &records));
}
