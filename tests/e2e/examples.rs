//! The shipped configurations (`examples/*.toml`) and the systemd unit
//! (`packaging/tsubame.service`) are kept honest: each example passes `tsubame
//! check-config` once the files it names exist, and the unit has what the examples and
//! the README's install section rely on.
//!
//! An example names absolute paths (`/etc/tsubame/...`, `/var/lib/tsubame`); the test
//! moves every one of them under a temporary directory and makes the file there: TLS
//! certificates from the test PKI, DKIM keys from `tsubame dkim keygen`, a users file
//! from `tsubame user add`, dummy secrets. Every absolute path an example names must be
//! listed here with what stands in for it, so a path added to an example without a
//! stand-in fails the test instead of going unchecked.

use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::{DocumentMut, Item, Value};
use tsubame_tests::cli::{tsubame, user_add};
use tsubame_tests::pki::TestPki;
use tsubame_tests::process::{find_program, hard_limit, run};

/// What the test puts at a path an example names.
#[derive(Debug, Clone, Copy)]
enum StandIn {
    /// The test PKI's server certificate chain (PEM).
    Certificate,
    /// The test PKI's server key (PEM).
    CertificateKey,
    /// A key from `tsubame dkim keygen --algorithm ALGORITHM`.
    DkimKey(&'static str),
    /// One line of made-up secret (a password, an API key, an OAuth client secret).
    Secret,
    /// A users file with these accounts, from `tsubame user add`.
    Users(&'static [&'static str]),
    /// An empty directory (the spool, a token directory).
    Directory,
}

struct Example {
    file: &'static str,
    paths: &'static [(&'static str, StandIn)],
}

const TLS_CERTIFICATE: (&str, StandIn) = ("/etc/tsubame/tls/fullchain.pem", StandIn::Certificate);
const TLS_KEY: (&str, StandIn) = ("/etc/tsubame/tls/privkey.pem", StandIn::CertificateKey);
/// The systemd unit's `StateDirectory=tsubame`.
const SPOOL: (&str, StandIn) = ("/var/lib/tsubame", StandIn::Directory);

const EXAMPLES: &[Example] = &[
    Example {
        file: "legacy-devices-gmail-oauth.toml",
        paths: &[
            TLS_CERTIFICATE,
            TLS_KEY,
            SPOOL,
            ("/etc/tsubame/users.toml", StandIn::Users(&["scanner-3f"])),
            ("/etc/tsubame/oauth/client.secret", StandIn::Secret),
            ("/etc/tsubame/oauth", StandIn::Directory),
        ],
    },
    Example {
        file: "notifications-relay-service-dkim.toml",
        paths: &[
            TLS_CERTIFICATE,
            TLS_KEY,
            SPOOL,
            ("/etc/tsubame/sendgrid-api-key", StandIn::Secret),
            (
                "/etc/tsubame/dkim/example.com.rsa2026.key",
                StandIn::DkimKey("rsa"),
            ),
            (
                "/etc/tsubame/dkim/example.com.ed2026.key",
                StandIn::DkimKey("ed25519"),
            ),
        ],
    },
    Example {
        file: "hosting-smarthost.toml",
        paths: &[
            TLS_CERTIFICATE,
            TLS_KEY,
            SPOOL,
            (
                "/etc/tsubame/users.toml",
                StandIn::Users(&["alice@customer-one.example"]),
            ),
            ("/etc/tsubame/relay-provider.secret", StandIn::Secret),
            (
                "/etc/tsubame/dkim/customer-one.example.s2026.key",
                StandIn::DkimKey("rsa"),
            ),
            (
                "/etc/tsubame/dkim/customer-two.example.s2026.key",
                StandIn::DkimKey("ed25519"),
            ),
        ],
    },
];

fn repository_file(relative: &str) -> PathBuf {
    tsubame_tests::workspace_directory().join(relative)
}

/// Calls `visit` on every string value of the document (tables, arrays of tables,
/// arrays, inline tables), so paths in `keys = [{ key_file = ... }]` are found too.
fn visit_strings(document: &mut DocumentMut, visit: &mut dyn FnMut(&mut String)) {
    fn value(entry: &mut Value, visit: &mut dyn FnMut(&mut String)) {
        match entry {
            Value::String(text) => {
                let mut string = text.value().clone();
                visit(&mut string);
                if string != *text.value() {
                    let decor = text.decor().clone();
                    *text = toml_edit::Formatted::new(string);
                    *text.decor_mut() = decor;
                }
            }
            Value::Array(array) => array.iter_mut().for_each(|item| value(item, visit)),
            Value::InlineTable(table) => table.iter_mut().for_each(|(_, item)| value(item, visit)),
            _ => {}
        }
    }
    fn item(entry: &mut Item, visit: &mut dyn FnMut(&mut String)) {
        match entry {
            Item::Value(inner) => value(inner, visit),
            Item::Table(table) => table.iter_mut().for_each(|(_, inner)| item(inner, visit)),
            Item::ArrayOfTables(tables) => tables
                .iter_mut()
                .for_each(|table| table.iter_mut().for_each(|(_, inner)| item(inner, visit))),
            Item::None => {}
        }
    }
    item(document.as_item_mut(), visit);
}

/// Makes the stand-in for `path` (already under the temporary directory).
fn make_stand_in(path: &Path, stand_in: StandIn, pki: &TestPki) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create the stand-in's directory");
    }
    match stand_in {
        StandIn::Certificate => {
            std::fs::copy(pki.certificate(), path).expect("copy the test certificate");
        }
        StandIn::CertificateKey => {
            std::fs::copy(pki.key(), path).expect("copy the test key");
        }
        StandIn::DkimKey(algorithm) => {
            // The key file holds only the key: the domain and selector given here are
            // for the record keygen prints, which this test does not publish.
            tsubame(&[
                "dkim",
                "keygen",
                "--domain",
                "example.com",
                "--selector",
                "test",
                "--algorithm",
                algorithm,
                "--out",
                path.to_str().expect("utf-8 path"),
            ])
            .assert_code(0);
        }
        StandIn::Secret => {
            std::fs::write(path, "made-up-secret-for-the-examples-test\n")
                .expect("write a stand-in secret");
        }
        StandIn::Users(names) => {
            for name in names {
                user_add(path, name, "examples-test-password");
            }
        }
        StandIn::Directory => {
            std::fs::create_dir_all(path).expect("create a stand-in directory");
        }
    }
}

#[test]
fn every_example_passes_check_config() {
    let _limit = hard_limit(Duration::from_secs(240));
    let pki = TestPki::new();
    let listed: Vec<String> = std::fs::read_dir(repository_file("examples"))
        .expect("examples/")
        .map(|entry| entry.expect("examples/ entry").file_name())
        .filter_map(|name| name.to_str().map(str::to_string))
        .filter(|name| name.ends_with(".toml"))
        .collect();
    for name in &listed {
        assert!(
            EXAMPLES.iter().any(|example| example.file == name),
            "examples/{name} is not checked by this test: add it to EXAMPLES"
        );
    }
    for example in EXAMPLES {
        let text = std::fs::read_to_string(repository_file(&format!("examples/{}", example.file)))
            .unwrap_or_else(|error| panic!("examples/{}: {error}", example.file));
        let mut document: DocumentMut = text
            .parse()
            .unwrap_or_else(|error| panic!("examples/{}: {error}", example.file));
        let root = tempfile::Builder::new()
            .prefix("tsubame-example-")
            .tempdir()
            .expect("temporary directory");

        // Every absolute path moves under the temporary directory; each must have a
        // stand-in, and each stand-in must be used.
        let mut unknown = Vec::new();
        let mut used = Vec::new();
        visit_strings(&mut document, &mut |string: &mut String| {
            if !string.starts_with('/') {
                return;
            }
            match example.paths.iter().find(|(path, _)| path == string) {
                Some((path, _)) => used.push(*path),
                None => unknown.push(string.clone()),
            }
            *string = format!("{}{string}", root.path().display());
        });
        assert!(
            unknown.is_empty(),
            "examples/{} names paths this test has no stand-in for: {unknown:?}",
            example.file
        );
        for (path, stand_in) in example.paths {
            assert!(
                used.contains(path),
                "examples/{}: {path} is listed in this test but not in the example",
                example.file
            );
            make_stand_in(
                &root.path().join(path.trim_start_matches('/')),
                *stand_in,
                &pki,
            );
        }

        let config = root.path().join(example.file);
        std::fs::write(&config, document.to_string()).expect("write the rewritten example");
        let run = tsubame(&["check-config", config.to_str().expect("utf-8 path")]);
        run.assert_code(0);
        let out = run.stdout_text();
        assert!(
            out.contains(": ok"),
            "examples/{}: {}",
            example.file,
            run.describe()
        );
        // Every example signs all it means to: no route left without a DKIM domain.
        assert!(
            !out.contains("warning"),
            "examples/{} draws a warning from check-config:\n{out}",
            example.file
        );
    }
}

/// `KEY=VALUE` lines of the unit (comments and section headers left out).
fn unit_settings(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#') && !line.starts_with('['))
        .filter_map(|line| line.split_once('='))
        .collect()
}

#[test]
fn systemd_unit_has_what_the_examples_rely_on() {
    let _limit = hard_limit(Duration::from_secs(120));
    let path = repository_file("packaging/tsubame.service");
    let text = std::fs::read_to_string(&path).expect("packaging/tsubame.service");
    let settings = unit_settings(&text);
    let setting = |key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(name, _)| *name == key)
            .map(|(_, value)| *value)
            .collect()
    };
    for (key, expected) in [
        ("Type", "simple"),
        ("User", "tsubame"),
        (
            "ExecStart",
            "/usr/local/bin/tsubame serve --config /etc/tsubame/tsubame.toml",
        ),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("KillSignal", "SIGTERM"),
        ("Restart", "on-failure"),
        ("StateDirectory", "tsubame"),
        ("ReadWritePaths", "/var/lib/tsubame"),
        ("NoNewPrivileges", "true"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "true"),
        ("PrivateTmp", "true"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("WantedBy", "multi-user.target"),
    ] {
        assert_eq!(setting(key), [expected], "packaging/tsubame.service: {key}");
    }
    // The graceful stop (deliveries get [delivery] shutdown_timeout_secs, 30 s by
    // default and in every example) must finish before systemd kills the relay.
    let stop_secs: u64 = setting("TimeoutStopSec")
        .first()
        .and_then(|value| value.parse().ok())
        .expect("TimeoutStopSec in seconds");
    assert!(stop_secs > 30, "TimeoutStopSec={stop_secs}");
    // max_connections (10,000 by default, 20,000 in the hosting example) descriptors
    // and more, so that `serve` need not raise the limit itself.
    let files: u64 = setting("LimitNOFILE")
        .first()
        .and_then(|value| value.parse().ok())
        .expect("LimitNOFILE as a number");
    assert!(files >= 20_000 + 256, "LimitNOFILE={files}");
    // Not ~@resources: serve calls setrlimit when the limit is below max_connections.
    assert!(
        !setting("SystemCallFilter")
            .iter()
            .any(|filter| filter.contains("@resources")),
        "the unit's system call filter must allow setrlimit"
    );
    for example in EXAMPLES {
        let text = std::fs::read_to_string(repository_file(&format!("examples/{}", example.file)))
            .expect("example");
        assert!(
            text.contains("directory = \"/var/lib/tsubame\""),
            "examples/{}: the spool is not the unit's StateDirectory",
            example.file
        );
    }

    // systemd's own check, where systemd is installed (it is not a test peer: a
    // relay's tests need no systemd). verify insists the ExecStart programs exist, so
    // the copy names the binary under test instead of /usr/local/bin/tsubame.
    let Some(analyze) = find_program("systemd-analyze") else {
        println!("note: systemd-analyze is not on PATH; `systemd-analyze verify` skipped");
        return;
    };
    let directory = tempfile::tempdir().expect("temporary directory");
    let copy = directory.path().join("tsubame.service");
    let binary = tsubame_tests::binary::tsubame().display().to_string();
    std::fs::write(&copy, text.replace("/usr/local/bin/tsubame", &binary))
        .expect("write the unit's copy");
    let verify = run(
        std::process::Command::new(analyze).arg("verify").arg(&copy),
        None,
        Duration::from_secs(60),
        "systemd-analyze verify",
    );
    verify.assert_code(0);
    assert!(
        verify.stderr_text().trim().is_empty(),
        "systemd-analyze verify complained: {}",
        verify.describe()
    );
}
