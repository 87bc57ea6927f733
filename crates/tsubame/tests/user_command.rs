//! `tsubame user add|list`, run as the real binary against a users file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use tsubame_config::{VerifyError, load_users_file};

/// Runs `tsubame ARGS` with `stdin` as its standard input.
fn tsubame(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tsubame"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The binary may refuse its arguments and exit before it reads a byte: a closed
    // pipe is then the expected outcome of the write, and the exit status tells the rest.
    if let Err(error) = child.stdin.take().unwrap().write_all(stdin) {
        assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe, "{error}");
    }
    child.wait_with_output().unwrap()
}

fn add(file: &Path, name: &str, password: &str) -> Output {
    let file = file.to_str().unwrap();
    tsubame(
        &[
            "user",
            "add",
            name,
            "--users-file",
            file,
            "--password-stdin",
        ],
        format!("{password}\n").as_bytes(),
    )
}

fn text_of(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn add_writes_a_private_argon2id_entry_that_verifies() {
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("users.toml");

    let output = add(&file, "dev", "s3cret pass");
    let said = text_of(&output);
    assert!(output.status.success(), "{said}");
    assert!(said.contains("added"), "{said}");

    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let users = load_users_file(&file).unwrap();
    let dev = users.find("dev").unwrap();
    let hash = dev.password_hash.expose();
    assert!(
        hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{hash}"
    );
    assert!(!said.contains(hash) && !said.contains("s3cret"), "{said}");
    assert_eq!(users.verify("dev", b"s3cret pass").unwrap().name, "dev");
    assert_eq!(
        users.verify("dev", b"s3cret pas").unwrap_err(),
        VerifyError::WrongPassword
    );
    // No temporary file left behind.
    let entries = std::fs::read_dir(directory.path()).unwrap().count();
    assert_eq!(entries, 1);
}

#[test]
fn add_replaces_a_password_and_keeps_everything_else() {
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("users.toml");
    assert!(add(&file, "dev", "first").status.success());
    assert!(add(&file, "printer", "printer pass").status.success());
    // Restrictions and a comment added by hand must survive a password change.
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("allowed_senders = [\"@example.com\"] # the printer's domain\n");
    text.insert_str(0, "# hand-written note\n");
    std::fs::write(&file, &text).unwrap();

    let output = add(&file, "dev", "second");
    assert!(output.status.success(), "{}", text_of(&output));
    assert!(text_of(&output).contains("new password"));
    let users = load_users_file(&file).unwrap();
    assert_eq!(users.len(), 2);
    assert!(users.verify("dev", b"second").is_ok());
    assert_eq!(
        users.verify("dev", b"first").unwrap_err(),
        VerifyError::WrongPassword
    );
    let printer = users.verify("printer", b"printer pass").unwrap();
    assert!(printer.sender_allowed("scan@example.com"));
    assert!(!printer.sender_allowed("scan@example.net"));
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("# hand-written note\n"), "{text}");
    assert!(text.contains("# the printer's domain"), "{text}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let output = tsubame(
        &["user", "list", "--users-file", file.to_str().unwrap()],
        b"",
    );
    let listed = text_of(&output);
    assert!(output.status.success(), "{listed}");
    assert!(
        listed.contains("dev  senders: any  recipient domains: any  upstream: by route"),
        "{listed}"
    );
    assert!(
        listed.contains("printer  senders: @example.com"),
        "{listed}"
    );
    assert!(listed.contains("2 user(s)"), "{listed}");
    assert!(!listed.contains("argon2"), "{listed}");
}

#[test]
fn add_refuses_bad_input_and_leaves_the_file_alone() {
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("users.toml");
    assert!(add(&file, "dev", "pass").status.success());
    let before = std::fs::read_to_string(&file).unwrap();

    let cases: &[(&str, &str, &str)] = &[
        ("dev", "", "empty password"),
        ("", "pass", "1 to 255 bytes"),
        ("bad\tname", "pass", "control characters"),
    ];
    for (name, password, want) in cases {
        let output = add(&file, name, password);
        let said = text_of(&output);
        assert_eq!(output.status.code(), Some(1), "{name:?}: {said}");
        assert!(said.contains(want), "{name:?}: {said}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), before);
    }

    // A file that does not check is not edited; the error names its line.
    std::fs::write(&file, "[[user]]\nname = \"x\"\npassword_hash = \"plain\"\n").unwrap();
    let output = add(&file, "dev", "pass");
    let said = text_of(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(
        said.contains("users.toml:3:17: password_hash is not a PHC string"),
        "{said}"
    );
    assert!(!said.contains("plain"), "{said}");

    // Not a terminal and no --password-stdin: refused, no prompt.
    std::fs::write(&file, &before).unwrap();
    let output = tsubame(
        &["user", "add", "dev", "--users-file", file.to_str().unwrap()],
        b"pass\npass\n",
    );
    let said = text_of(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(said.contains("--password-stdin"), "{said}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), before);
}

/// With --config, the file is the configuration's `[auth] users_file`, which need not
/// exist yet; `list --config` then shows the configuration's users and the file's.
#[test]
fn add_and_list_through_the_configuration() {
    let directory = tempfile::tempdir().unwrap();
    let users = directory.path().join("users.toml");
    let config = directory.path().join("tsubame.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\naddress = \"127.0.0.1:2525\"\n[auth]\nusers_file = \"{}\"\n",
            users.display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let output = tsubame(
        &["user", "add", "dev", "--config", config, "--password-stdin"],
        b"pass\n",
    );
    assert!(output.status.success(), "{}", text_of(&output));
    assert!(
        load_users_file(&users)
            .unwrap()
            .verify("dev", b"pass")
            .is_ok()
    );
    let output = tsubame(&["user", "list", "--config", config], b"");
    let listed = text_of(&output);
    assert!(output.status.success(), "{listed}");
    assert!(listed.contains("dev  senders: any"), "{listed}");
    let output = tsubame(&["check-config", config], b"");
    let checked = text_of(&output);
    assert!(
        checked.contains("1 device account(s) for AUTH (users file"),
        "{checked}"
    );
}
