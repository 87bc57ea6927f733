//! `tsubame dkim check` end to end: the real binary asks a real DNS server (dnslib,
//! through the end-to-end suite's `dns_zone.py` peer) for key records.
//!
//! The server is killed when its guard drops, and exits by itself when its stdin closes
//! or its lifetime ends; every run of the binary has a deadline.
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions, too

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tsubame_dkim::SigningKey;
use tsubame_tests::dns::DnsZone;
use tsubame_tests::process::{Finished, run};

/// Far above one lookup on loopback (milliseconds) and the binary's start.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

const DOMAIN: &str = "example.test";
/// Names the server answers with SERVFAIL.
const SERVFAIL_NAME: &str = "failing._domainkey.example.test";

/// Three keys, the zone that publishes them (rightly and wrongly), and its server.
struct Fixture {
    directory: tempfile::TempDir,
    _dns: DnsZone,
    nameserver: String,
}

fn tsubame(arguments: &[&str]) -> Finished {
    run(
        Command::new(env!("CARGO_BIN_EXE_tsubame")).args(arguments),
        None,
        RUN_TIMEOUT,
        "tsubame",
    )
}

/// Writes a key with `tsubame dkim keygen` and returns the zone line it printed.
fn keygen(directory: &Path, name: &str, algorithm: &str) -> String {
    let path = directory.join(name);
    let output = tsubame(&[
        "dkim",
        "keygen",
        "--domain",
        DOMAIN,
        "--selector",
        name,
        "--algorithm",
        algorithm,
        "--out",
        path.to_str().unwrap(),
    ]);
    output.assert_code(0);
    output.stdout_text().lines().next().unwrap().to_string()
}

fn txt_value(key_name: &str, directory: &Path) -> String {
    SigningKey::from_pem_file(&directory.join(key_name))
        .unwrap()
        .dns_txt_value()
}

impl Fixture {
    fn start() -> Self {
        let directory = tempfile::tempdir().unwrap();
        let dir = directory.path();
        // The selector of each correctly published key is its file name.
        let rsa_record = keygen(dir, "rsa", "rsa");
        let ed_record = keygen(dir, "ed", "ed25519");
        std::fs::write(
            dir.join("other"),
            tsubame_dkim::generate_ed25519_pem().unwrap(),
        )
        .unwrap();
        let ed = txt_value("ed", dir);
        let other = txt_value("other", dir);
        let ed_key = ed.trim_start_matches("v=DKIM1; k=ed25519; ");
        let zone = format!(
            "$TTL 60\n\
             {DOMAIN}. SOA ns.{DOMAIN}. hostmaster.{DOMAIN}. 1 3600 600 86400 60\n\
             {rsa_record}\n\
             {ed_record}\n\
             different._domainkey.{DOMAIN}. TXT \"{other}\"\n\
             revoked._domainkey.{DOMAIN}. TXT \"v=DKIM1; k=ed25519; p=\"\n\
             testing._domainkey.{DOMAIN}. TXT \"v=DKIM1; k=ed25519; t=y; {ed_key}\"\n\
             duplicate._domainkey.{DOMAIN}. TXT \"v=DKIM1; k=ed25519; {ed_key}; {ed_key}\"\n\
             twice._domainkey.{DOMAIN}. TXT \"{ed}\"\n\
             twice._domainkey.{DOMAIN}. TXT \"{other}\"\n\
             address._domainkey.{DOMAIN}. A 192.0.2.1\n"
        );
        let dns = DnsZone::start_with_servfail(&zone, &[SERVFAIL_NAME]);
        let nameserver = dns.address().to_string();
        Fixture {
            directory,
            _dns: dns,
            nameserver,
        }
    }

    fn key(&self, name: &str) -> PathBuf {
        self.directory.path().join(name)
    }

    /// `tsubame dkim check` of `selector` against the key file `key`.
    fn check(&self, selector: &str, key: &str) -> Finished {
        let output = tsubame(&[
            "dkim",
            "check",
            "--domain",
            DOMAIN,
            "--selector",
            selector,
            "--key",
            self.key(key).to_str().unwrap(),
            "--nameserver",
            &self.nameserver,
            "--timeout-secs",
            "10",
        ]);
        // Whatever the verdict, the private key never shows.
        let pem = std::fs::read_to_string(self.key(key)).unwrap();
        for line in pem.lines().filter(|line| !line.starts_with("-----")) {
            assert!(!output.stdout_text().contains(line), "key printed");
            assert!(!output.stderr_text().contains(line), "key printed");
        }
        output
    }
}

#[track_caller]
fn expect(output: &Finished, code: i32, text: &str) {
    output.assert_code(code);
    assert!(
        output.stdout_text().contains(text) || output.stderr_text().contains(text),
        "expected {text:?}\n{}",
        output.describe()
    );
}

#[test]
fn published_keys_match_and_the_split_rsa_record_is_joined() {
    let fixture = Fixture::start();
    let rsa = fixture.check("rsa", "rsa");
    // A 2048-bit record is about 410 bytes: two strings of at most 255.
    expect(&rsa, 0, "bytes in 2 strings)");
    let key_path = fixture.key("rsa");
    expect(
        &rsa,
        0,
        &format!(
            "rsa._domainkey.example.test: matches the key in {} (rsa-sha256, 2048 bits)",
            key_path.display()
        ),
    );
    let ed = fixture.check("ed", "ed");
    expect(&ed, 0, "bytes in 1 string)");
    expect(&ed, 0, "matches the key in");
    assert!(!ed.stdout_text().contains("warning"), "{}", ed.describe());
}

#[test]
fn wrong_records_say_what_is_wrong() {
    let fixture = Fixture::start();
    let cases = [
        ("different", "ed", "different public key: p= does not match"),
        ("revoked", "ed", "the key is revoked: p= is empty"),
        ("ed", "rsa", "key type mismatch: the record has k=ed25519, "),
        (
            "duplicate",
            "ed",
            "syntax error in the record: the tag p= appears twice",
        ),
        ("twice", "ed", "more than one DKIM record (2 TXT records)"),
        ("missing", "ed", "no such name (NXDOMAIN)"),
        ("address", "ed", "the name exists but has no TXT record"),
    ];
    for (selector, key, message) in cases {
        let output = fixture.check(selector, key);
        expect(&output, 1, message);
        // Every failure shows what to publish instead.
        let expected = SigningKey::from_pem_file(&fixture.key(key))
            .unwrap()
            .dns_txt_record(DOMAIN, selector);
        expect(&output, 1, &expected);
    }
}

#[test]
fn testing_flag_warns_and_dns_failure_exits_4() {
    let fixture = Fixture::start();
    let testing = fixture.check("testing", "ed");
    expect(&testing, 0, "warning: t=y");
    expect(&testing, 0, "matches the key in");
    let failing = fixture.check("failing", "ed");
    expect(
        &failing,
        4,
        "DNS lookup of failing._domainkey.example.test failed",
    );
    assert!(failing.stdout_text().is_empty(), "{}", failing.describe());
}

#[test]
fn config_names_the_key_file() {
    let fixture = Fixture::start();
    let config = fixture.directory.path().join("tsubame.toml");
    // Key files are taken as the configuration writes them; absolute paths here.
    std::fs::write(
        &config,
        format!(
            "[[listener]]\naddress = \"127.0.0.1:2525\"\n\n\
             [[dkim]]\ndomain = \"{DOMAIN}\"\nkeys = [\n\
             \x20 {{ selector = \"rsa\", key_file = {:?} }},\n\
             \x20 {{ selector = \"ed\", key_file = {:?} }},\n]\n",
            fixture.key("rsa"),
            fixture.key("ed"),
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let with_config = |domain: &str, selector: &str| {
        tsubame(&[
            "dkim",
            "check",
            "--domain",
            domain,
            "--selector",
            selector,
            "--config",
            config,
            "--nameserver",
            &fixture.nameserver,
        ])
    };
    let ed = with_config(DOMAIN, "ed");
    expect(
        &ed,
        0,
        &format!("matches the key in {}", fixture.key("ed").display()),
    );
    expect(&with_config(DOMAIN, "rsa"), 0, "(rsa-sha256, 2048 bits)");
    expect(
        &with_config(DOMAIN, "other"),
        1,
        "has no selector other (it has: rsa, ed)",
    );
    expect(
        &with_config("elsewhere.test", "ed"),
        1,
        "has no [[dkim]] entry for domain elsewhere.test",
    );
}
