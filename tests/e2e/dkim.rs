//! DKIM end to end: smtplib → tsubame (signing with keys made by `tsubame dkim keygen`)
//! → aiosmtpd, and every message that arrives is verified by dkimpy and by mail-auth's
//! own verifier, fed the TXT records keygen printed. A byte changed after signing must
//! fail both, so a verifier that passes everything fails these tests.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tsubame_tests::cli::tsubame;
use tsubame_tests::dkim::{dkimpy_verifies, mail_auth_verifies};
use tsubame_tests::process::hard_limit;
use tsubame_tests::server::{Server, ServerOptions};
use tsubame_tests::upstream::{Aiosmtpd, Received, wait_until};

use crate::delivery::upstream_config;

/// Long enough for a delivery on a loaded CI machine.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// A published key: (DNS name, TXT value).
type Record = (String, String);

/// `tsubame dkim keygen`: writes the key into `directory` and returns its path and the
/// record the command printed.
#[track_caller]
fn keygen(directory: &Path, domain: &str, selector: &str, algorithm: &str) -> (PathBuf, Record) {
    let path = directory.join(format!("{domain}.{selector}.key"));
    let run = tsubame(&[
        "dkim",
        "keygen",
        "--domain",
        domain,
        "--selector",
        selector,
        "--algorithm",
        algorithm,
        "--out",
        path.to_str().expect("utf-8 path"),
    ]);
    run.assert_code(0);
    let stdout = run.stdout_text();
    let value = stdout
        .lines()
        .find(|line| line.starts_with("v=DKIM1"))
        .unwrap_or_else(|| panic!("keygen printed no record value:\n{stdout}"))
        .to_string();
    (path, (format!("{selector}._domainkey.{domain}."), value))
}

fn dkim_entry(domain: &str, keys: &[(&str, &Path)]) -> String {
    let keys: Vec<String> = keys
        .iter()
        .map(|(selector, path)| {
            format!(
                "{{ selector = \"{selector}\", key_file = \"{}\" }}",
                path.display()
            )
        })
        .collect();
    format!(
        "[[dkim]]\ndomain = \"{domain}\"\nkeys = [{}]\n",
        keys.join(", ")
    )
}

#[track_caller]
fn send(server: &Server, from: &str, content: &[u8], eight_bit: bool) -> String {
    let parameters: &[&str] = if eight_bit { &["BODY=8BITMIME"] } else { &[] };
    crate::send_from(server.address(), from, parameters, content)
}

/// The header fields at the top of a delivered message that tsubame added (everything
/// before the first field the client sent, our Received included), and the rest.
fn split_added(content: &[u8], first_client_field: &[u8]) -> (String, Vec<u8>) {
    let at = content
        .windows(first_client_field.len())
        .position(|window| window == first_client_field)
        .unwrap_or_else(|| {
            panic!(
                "no {:?} in the delivered message:\n{}",
                String::from_utf8_lossy(first_client_field),
                String::from_utf8_lossy(content)
            )
        });
    (
        String::from_utf8_lossy(&content[..at]).into_owned(),
        content[at..].to_vec(),
    )
}

/// The unfolded DKIM-Signature fields of a header block.
fn signatures(header_block: &str) -> Vec<String> {
    let mut fields: Vec<String> = Vec::new();
    for line in header_block.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.push_str(line.trim());
            }
        } else {
            fields.push(line.to_string());
        }
    }
    fields
        .into_iter()
        .filter(|field| field.to_ascii_lowercase().starts_with("dkim-signature:"))
        .collect()
}

/// The value of tag `name` in an unfolded DKIM-Signature field.
fn tag(signature: &str, name: &str) -> Option<String> {
    let value = signature.split_once(':')?.1;
    value.split(';').find_map(|item| {
        let (key, value) = item.split_once('=')?;
        (key.trim() == name).then(|| value.split_whitespace().collect())
    })
}

fn message(from: &str, subject: &str, body: &str) -> Vec<u8> {
    tsubame_tests::crlf(&format!(
        "From: Sender <{from}>\nTo: rcpt@example.net\nSubject: {subject}\n\
         Date: Thu, 26 Nov 2026 10:00:00 +0000\nMessage-ID: <{subject}@dkim.tsubame.test>\n\
         MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n{body}"
    ))
}

fn message_8bit(from: &str) -> Vec<u8> {
    let mut content = tsubame_tests::crlf(&format!(
        "From: =?UTF-8?Q?J=C3=BCrgen?= <{from}>\nTo: rcpt@example.net\nSubject: eight-bit\n\
         MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\
         Content-Transfer-Encoding: 8bit\n\n"
    ));
    content.extend_from_slice("Grüße aus Köln, 東京から、ça va ? \u{1F985}\r\n".as_bytes());
    content
}

fn message_long_folded(from: &str) -> Vec<u8> {
    let mut content =
        format!("From: \"A display name long enough to fold\"\r\n <{from}>\r\nTo: ").into_bytes();
    for n in 0..40 {
        content.extend_from_slice(format!("user{n}@example.net,\r\n\t").as_bytes());
    }
    content.extend_from_slice(
        b"last@example.net\r\nSubject: folded\r\n  over two lines\r\n\r\nbody\r\n",
    );
    content
}

fn message_empty_body(from: &str) -> Vec<u8> {
    format!("From: {from}\r\nTo: rcpt@example.net\r\nSubject: empty-body\r\n\r\n").into_bytes()
}

/// The delivered message whose content contains `marker`.
#[track_caller]
fn find<'a>(received: &'a [Received], marker: &str) -> &'a Received {
    received
        .iter()
        .find(|message| {
            message
                .content
                .windows(marker.len())
                .any(|window| window == marker.as_bytes())
        })
        .unwrap_or_else(|| panic!("no delivered message contains {marker:?}"))
}

/// Both verifiers pass the message, it has `expected` signatures of domain `domain`,
/// and below the added fields it is exactly what the client sent.
#[track_caller]
fn assert_signed(
    delivered: &Received,
    sent: &[u8],
    domain: &str,
    expected: usize,
    records: &[Record],
) {
    let (added, rest) = split_added(&delivered.content, &sent[..sent.len().min(12)]);
    let found = signatures(&added);
    assert_eq!(found.len(), expected, "signatures in:\n{added}");
    for signature in &found {
        assert_eq!(tag(signature, "d").as_deref(), Some(domain), "{signature}");
        assert_eq!(
            tag(signature, "c").as_deref(),
            Some("relaxed/relaxed"),
            "{signature}"
        );
    }
    tsubame_tests::assert_bytes_eq(&rest, sent, "content below the added fields");
    assert!(
        dkimpy_verifies(&delivered.content, records),
        "dkimpy failed on:\n{}",
        String::from_utf8_lossy(&delivered.content)
    );
    assert!(
        mail_auth_verifies(&delivered.content, records),
        "mail-auth failed on:\n{}",
        String::from_utf8_lossy(&delivered.content)
    );
}

/// One body byte changed after signing: both verifiers must refuse it.
#[track_caller]
fn assert_tamper_fails(delivered: &Received, records: &[Record]) {
    let mut changed = delivered.content.clone();
    let body_start = changed
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("a header/body separator")
        + 4;
    let Some(byte) = changed.get_mut(body_start) else {
        panic!("no body byte to change");
    };
    *byte = if *byte == b'X' { b'Y' } else { b'X' };
    assert!(
        !dkimpy_verifies(&changed, records),
        "dkimpy passed a changed body"
    );
    assert!(
        !mail_auth_verifies(&changed, records),
        "mail-auth passed a changed body"
    );
}

#[test]
fn rsa_ed25519_and_dual_signatures_verify_with_dkimpy_and_mail_auth() {
    let _limit = hard_limit(Duration::from_secs(120));
    let keys = tempfile::tempdir().expect("temporary directory");
    let (rsa_key, rsa_record) = keygen(keys.path(), "rsa.example", "r1", "rsa");
    let (ed_key, ed_record) = keygen(keys.path(), "ed.example", "e1", "ed25519");
    let (dual_rsa, dual_rsa_record) = keygen(keys.path(), "dual.example", "r2", "rsa");
    let (dual_ed, dual_ed_record) = keygen(keys.path(), "dual.example", "e2", "ed25519");
    let records = vec![rsa_record, ed_record, dual_rsa_record, dual_ed_record];
    let upstream = Aiosmtpd::start(&[]);
    let config = format!(
        "{}{}{}{}",
        upstream_config(upstream.port(), ""),
        dkim_entry("rsa.example", &[("r1", &rsa_key)]),
        dkim_entry("ed.example", &[("e1", &ed_key)]),
        dkim_entry("dual.example", &[("r2", &dual_rsa), ("e2", &dual_ed)]),
    );
    let server = Server::start(&ServerOptions::new().deliver().config(&config));
    let cases: Vec<(&str, Vec<u8>, bool, &str, usize)> = vec![
        (
            "rsa-plain",
            message("a@rsa.example", "rsa-plain", "Hello,\n\ntwo  spaces.\n"),
            false,
            "rsa.example",
            1,
        ),
        (
            "eight-bit",
            message_8bit("a@rsa.example"),
            true,
            "rsa.example",
            1,
        ),
        (
            "folded",
            message_long_folded("a@rsa.example"),
            false,
            "rsa.example",
            1,
        ),
        (
            "empty-body",
            message_empty_body("a@rsa.example"),
            false,
            "rsa.example",
            1,
        ),
        (
            "ed-plain",
            message("a@ed.example", "ed-plain", "Hello from Ed25519.\n"),
            false,
            "ed.example",
            1,
        ),
        (
            "dual-plain",
            // A subdomain of a signing domain is signed by it (DMARC relaxed alignment).
            message("a@news.dual.example", "dual-plain", ".dot line\nend\n"),
            false,
            "dual.example",
            2,
        ),
    ];
    for (_, content, eight_bit, _, _) in &cases {
        send(&server, "bounce@example.org", content, *eight_bit);
    }
    let received = upstream.wait_for(cases.len(), DELIVERY_TIMEOUT);
    for (marker, content, _, domain, expected) in &cases {
        let delivered = find(&received, &format!("Subject: {marker}"));
        assert_signed(delivered, content, domain, *expected, &records);
    }
    // The dual signature lists RSA first, then Ed25519.
    let dual = find(&received, "Subject: dual-plain");
    let (added, _) = split_added(&dual.content, b"From: ");
    let algorithms: Vec<Option<String>> = signatures(&added)
        .iter()
        .map(|signature| tag(signature, "a"))
        .collect();
    assert_eq!(
        algorithms,
        [
            Some("rsa-sha256".to_string()),
            Some("ed25519-sha256".to_string())
        ]
    );
    assert_tamper_fails(find(&received, "Subject: rsa-plain"), &records);
    assert_tamper_fails(find(&received, "Subject: ed-plain"), &records);
    assert_tamper_fails(dual, &records);
    server.stop();
}

#[test]
fn a_route_adds_one_click_unsubscribe_before_signing_and_unkeyed_mail_goes_unsigned() {
    let _limit = hard_limit(Duration::from_secs(120));
    let keys = tempfile::tempdir().expect("temporary directory");
    let (key, record) = keygen(keys.path(), "news.example", "n1", "ed25519");
    let records = vec![record];
    let upstream = Aiosmtpd::start(&[]);
    let config = format!(
        "{}{}\
         [[route]]\nsender_domains = [\"news.example\"]\nupstream = \"sink\"\n\
         list_unsubscribe = \"<mailto:unsubscribe@news.example>, <https://news.example/u?id=42>\"\n\
         list_unsubscribe_post = true\n\
         [[route]]\nsender_domains = [\"nokey.example\"]\nupstream = \"sink\"\n",
        upstream_config(upstream.port(), ""),
        dkim_entry("news.example", &[("n1", &key)]),
    );
    let server = Server::start(&ServerOptions::new().deliver().config(&config));
    assert!(
        server
            .log()
            .contains("sends mail from \"nokey.example\", which no [[dkim]] domain covers"),
        "no start-up warning for the unkeyed route:\n{}",
        server.log()
    );
    let bulk = message("list@news.example", "bulk", "Weekly news.\n");
    let own_header = tsubame_tests::crlf(
        "From: list@news.example\nTo: rcpt@example.net\nSubject: own-header\n\
         List-Unsubscribe: <mailto:own@news.example>\n\nHas its own.\n",
    );
    let unkeyed = message("a@nokey.example", "unkeyed", "No key for this one.\n");
    send(&server, "list@news.example", &bulk, false);
    send(&server, "list@news.example", &own_header, false);
    send(&server, "a@nokey.example", &unkeyed, false);
    let received = upstream.wait_for(3, DELIVERY_TIMEOUT);

    let delivered = find(&received, "Subject: bulk");
    let (added, rest) = split_added(&delivered.content, b"From: ");
    tsubame_tests::assert_bytes_eq(&rest, &bulk, "bulk content below the added fields");
    assert!(
        added.contains(
            "List-Unsubscribe: <mailto:unsubscribe@news.example>, <https://news.example/u?id=42>\r\n\
             List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        ),
        "{added}"
    );
    let signed = signatures(&added);
    assert_eq!(signed.len(), 1, "{added}");
    let listed = tag(&signed[0], "h")
        .unwrap_or_default()
        .to_ascii_lowercase();
    // RFC 8058 section 4: both fields must be covered by the signature.
    assert!(
        listed.split(':').any(|name| name == "list-unsubscribe")
            && listed
                .split(':')
                .any(|name| name == "list-unsubscribe-post"),
        "h={listed}"
    );
    assert!(dkimpy_verifies(&delivered.content, &records));
    assert!(mail_auth_verifies(&delivered.content, &records));

    let delivered = find(&received, "Subject: own-header");
    let (added, rest) = split_added(&delivered.content, b"From: ");
    tsubame_tests::assert_bytes_eq(&rest, &own_header, "own-header content");
    assert!(
        !added.split("\r\n").any(|line| line.starts_with("List-")),
        "{added}"
    );
    let signed = signatures(&added);
    assert_eq!(signed.len(), 1);
    // The message's own List-Unsubscribe is signed too (RFC 8058 section 4).
    let listed = tag(&signed[0], "h")
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        listed.split(':').any(|name| name == "list-unsubscribe"),
        "h={listed}"
    );
    assert!(dkimpy_verifies(&delivered.content, &records));
    assert!(mail_auth_verifies(&delivered.content, &records));

    let delivered = find(&received, "Subject: unkeyed");
    let (added, rest) = split_added(&delivered.content, b"From: ");
    tsubame_tests::assert_bytes_eq(&rest, &unkeyed, "unkeyed content");
    assert!(signatures(&added).is_empty(), "{added}");
    server.stop();
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

#[test]
fn a_restart_sends_the_stored_signature_and_signs_what_was_never_signed() {
    let _limit = hard_limit(Duration::from_secs(150));
    let keys = tempfile::tempdir().expect("temporary directory");
    let spool = tempfile::tempdir().expect("temporary directory");
    let (key, record) = keygen(keys.path(), "rsa.example", "r1", "rsa");
    let records = vec![record];
    let upstream = Aiosmtpd::start(&[]);
    let signing_config = format!(
        "{}{}",
        upstream_config(upstream.port(), ""),
        dkim_entry("rsa.example", &[("r1", &key)])
    );

    // Run 1 holds the mail: it is signed and its signature stored, nothing is sent.
    let held = Server::start(
        &ServerOptions::new()
            .spool(spool.path())
            .config(&signing_config),
    );
    let stored = message("a@rsa.example", "signed-before-restart", "Signed once.\n");
    let id = send(&held, "a@rsa.example", &stored, false);
    let spool_path = spool.path().to_str().unwrap_or("");
    let signed = wait_until(DELIVERY_TIMEOUT, || {
        let inspect = tsubame(&["spool", "inspect", "--spool", spool_path, "--show", &id]);
        inspect
            .stdout_text()
            .contains("added fields: DKIM-Signature (")
    });
    assert!(signed, "the signature never reached the spool");
    held.stop();
    let first_run_over = now_secs();

    // Run 2 has no keys and holds too: its message is spooled unsigned.
    let unsigned_config = upstream_config(upstream.port(), "");
    let plain = Server::start(
        &ServerOptions::new()
            .spool(spool.path())
            .config(&unsigned_config),
    );
    let later = message(
        "b@rsa.example",
        "signed-after-restart",
        "Signed at start.\n",
    );
    send(&plain, "b@rsa.example", &later, false);
    plain.stop();
    // t= has a resolution of one second: a second signing would carry a later value.
    std::thread::sleep(Duration::from_millis(1100));
    let second_run_start = now_secs();

    let delivering = Server::start(
        &ServerOptions::new()
            .spool(spool.path())
            .config(&signing_config)
            .deliver(),
    );
    let received = upstream.wait_for(2, DELIVERY_TIMEOUT);
    let first = find(&received, "Subject: signed-before-restart");
    assert_signed(first, &stored, "rsa.example", 1, &records);
    let (added, _) = split_added(&first.content, b"From: ");
    let time: u64 = tag(&signatures(&added)[0], "t")
        .and_then(|t| t.parse().ok())
        .expect("a t= tag");
    assert!(
        time <= first_run_over,
        "the message was signed again after the restart (t={time}, first run over at {first_run_over})"
    );
    let second = find(&received, "Subject: signed-after-restart");
    assert_signed(second, &later, "rsa.example", 1, &records);
    let (added, _) = split_added(&second.content, b"From: ");
    let time: u64 = tag(&signatures(&added)[0], "t")
        .and_then(|t| t.parse().ok())
        .expect("a t= tag");
    assert!(time >= second_run_start, "t={time}");
    assert!(
        delivering
            .log()
            .contains("signing recovered messages that have no stored signature"),
        "{}",
        delivering.log()
    );
    delivering.stop();
}

#[test]
fn check_config_reads_the_keys_and_names_a_bad_one() {
    let _limit = hard_limit(Duration::from_secs(60));
    let keys = tempfile::tempdir().expect("temporary directory");
    let (key, _) = keygen(keys.path(), "rsa.example", "r1", "rsa");
    let base = upstream_config(2, "");
    let good = keys.path().join("good.toml");
    std::fs::write(
        &good,
        format!(
            "{base}{}[[route]]\nsender_domains = [\"other.example\"]\nupstream = \"sink\"\n",
            dkim_entry("rsa.example", &[("r1", &key)])
        ),
    )
    .expect("write config");
    let run = tsubame(&["check-config", good.to_str().unwrap_or("")]);
    run.assert_code(0);
    let out = run.stdout_text();
    assert!(
        out.contains("r1._domainkey.rsa.example (rsa-sha256, 2048 bits"),
        "{out}"
    );
    assert!(
        out.contains("warning: ") && out.contains("\"other.example\""),
        "{out}"
    );

    // Not a key: refused, the file named, its content not echoed.
    let not_a_key = keys.path().join("not-a-key.pem");
    std::fs::write(&not_a_key, "SECRET-LOOKING-CONTENT\n").expect("write");
    let bad = keys.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!("{base}{}", dkim_entry("rsa.example", &[("r1", &not_a_key)])),
    )
    .expect("write config");
    let run = tsubame(&["check-config", bad.to_str().unwrap_or("")]);
    assert_ne!(run.code(), Some(0), "{}", run.describe());
    let err = run.stderr_text();
    assert!(err.contains("not-a-key.pem"), "{err}");
    assert!(!err.contains("SECRET-LOOKING-CONTENT"), "{err}");

    // A route naming a dkim_domain nobody configured: refused with its line.
    let unknown = keys.path().join("unknown.toml");
    std::fs::write(
        &unknown,
        format!(
            "{base}[[route]]\nsender_domains = [\"x.example\"]\nupstream = \"sink\"\ndkim_domain = \"x.example\"\n"
        ),
    )
    .expect("write config");
    let run = tsubame(&["check-config", unknown.to_str().unwrap_or("")]);
    assert_ne!(run.code(), Some(0), "{}", run.describe());
    assert!(
        run.stderr_text().contains("has no [[dkim]] entry"),
        "{}",
        run.describe()
    );
}
