//! `tsubame dkim keygen` end to end: the key file, its mode, the printed record.
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions, too

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};

fn keygen(arguments: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tsubame"))
        .args(["dkim", "keygen"])
        .args(arguments)
        .output()
        .unwrap()
}

fn check_written(output: &Output, path: &Path, domain: &str, selector: &str, key_type: &str) {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let key = tsubame_dkim::SigningKey::from_pem_file(path).unwrap();
    let stdout = String::from_utf8(output.stdout.clone()).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(lines[0], key.dns_txt_record(domain, selector));
    assert!(lines[0].starts_with(&format!(
        "{selector}._domainkey.{domain}. IN TXT \"v=DKIM1; k={key_type}; p="
    )));
    assert_eq!(lines[1], key.dns_txt_value());
    let pem = std::fs::read_to_string(path).unwrap();
    assert!(
        !stdout.contains(pem.lines().nth(1).unwrap()),
        "key material printed"
    );
    assert!(!String::from_utf8_lossy(&output.stderr).contains(pem.lines().nth(1).unwrap()));
}

/// `tsubame dkim keygen` of an Ed25519 key for `domain`, selector ed2026, into `path`.
fn keygen_ed25519(domain: &str, path: &str, extra: &[&str]) -> Output {
    let mut arguments = vec![
        "--domain",
        domain,
        "--selector",
        "ed2026",
        "--algorithm",
        "ed25519",
        "--out",
        path,
    ];
    arguments.extend_from_slice(extra);
    keygen(&arguments)
}

#[test]
fn ed25519_key_is_written_0600_and_its_record_printed() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("ed.key");
    let path_text = path.to_str().unwrap();
    let output = keygen_ed25519("Example.COM.", path_text, &[]);
    check_written(&output, &path, "example.com", "ed2026", "ed25519");

    // Not replaced without --force; replaced with it.
    let before = std::fs::read(&path).unwrap();
    let again = keygen_ed25519("example.com", path_text, &[]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let forced = keygen_ed25519("example.com", path_text, &["--force"]);
    check_written(&forced, &path, "example.com", "ed2026", "ed25519");
    assert_ne!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn rsa_key_record_is_split_into_strings() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("rsa.key");
    let output = keygen(&[
        "--domain",
        "example.com",
        "--selector",
        "rsa2026",
        "--out",
        path.to_str().unwrap(),
    ]);
    check_written(&output, &path, "example.com", "rsa2026", "rsa");
    let stdout = String::from_utf8(output.stdout).unwrap();
    // A 2048-bit record is about 410 bytes: two strings.
    assert_eq!(
        stdout.lines().next().unwrap().matches("\" \"").count(),
        1,
        "{stdout}"
    );
    assert_eq!(
        tsubame_dkim::SigningKey::from_pem_file(&path)
            .unwrap()
            .bits(),
        2048
    );
}

#[test]
fn bad_arguments_are_refused_before_generating() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("k.key");
    let path_text = path.to_str().unwrap();
    let bad_selector = keygen(&[
        "--domain",
        "example.com",
        "--selector",
        "a b",
        "--out",
        path_text,
    ]);
    assert_eq!(bad_selector.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad_selector.stderr).contains("invalid DKIM selector"));
    let small = keygen(&[
        "--domain",
        "example.com",
        "--selector",
        "s",
        "--bits",
        "1024",
        "--out",
        path_text,
    ]);
    assert_eq!(
        small.status.code(),
        Some(2),
        "clap refuses sizes outside 2048/3072/4096"
    );
    assert!(!path.exists());
}
