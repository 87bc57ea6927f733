//! The command line: --help, --version, check-config, serve's start-up errors, the
//! embedded default, and spool inspect's own errors.

use std::path::Path;
use std::time::Duration;

use tsubame_tests::cli::{tsubame, tsubame_in};
use tsubame_tests::peers::Smtplib;
use tsubame_tests::process::hard_limit;
use tsubame_tests::server::{Server, ServerOptions};

use crate::test_message;

#[test]
fn help_of_every_subcommand() {
    let _limit = hard_limit(Duration::from_secs(60));
    for arguments in [
        &["--help"][..],
        &["help"],
        &["serve", "--help"],
        &["help", "serve"],
        &["check-config", "--help"],
        &["spool", "--help"],
        &["spool", "inspect", "--help"],
        &["log", "--help"],
        &["log", "search", "--help"],
        &["log", "export", "--help"],
    ] {
        let run = tsubame(arguments);
        run.assert_code(0);
        assert!(
            run.stdout_text().contains("Usage:"),
            "no usage text: {}",
            run.describe()
        );
    }
    let serve = tsubame(&["serve", "--help"]).stdout_text();
    for option in [
        "--config",
        "--listen",
        "--spool",
        "--relay-network",
        "--threads",
        "--log-level",
    ] {
        assert!(
            serve.contains(option),
            "serve --help lacks {option}:\n{serve}"
        );
    }
    let inspect = tsubame(&["spool", "inspect", "--help"]).stdout_text();
    for option in ["--spool", "--config", "--json", "--show"] {
        assert!(
            inspect.contains(option),
            "spool inspect --help lacks {option}:\n{inspect}"
        );
    }
}

#[test]
fn version_is_printed() {
    let _limit = hard_limit(Duration::from_secs(60));
    let version = env!("CARGO_PKG_VERSION");
    let run = tsubame(&["--version"]);
    run.assert_code(0);
    assert_eq!(
        run.stdout_text().trim(),
        format!("tsubame {version}"),
        "{}",
        run.describe()
    );
    // clap names the subcommand: `tsubame-serve 0.1.0`.
    let run = tsubame(&["serve", "--version"]);
    run.assert_code(0);
    assert!(
        run.stdout_text().trim().ends_with(&format!(" {version}")),
        "{}",
        run.describe()
    );
}

#[test]
fn usage_errors_exit_2() {
    let _limit = hard_limit(Duration::from_secs(60));
    for arguments in [
        &["no-such-command"][..],
        &[],
        &["serve", "--no-such-flag"],
        &["serve", "--listen", "not-an-address"],
        &["serve", "--relay-network", "300.1.2.3/8"],
        &["check-config"],
        &["log", "export"],
        &["log", "search", "--status", "lost"],
        &["log", "search", "--category", "gremlins"],
        &["log", "search", "--since", "26/11/2026"],
        &["log", "search", "--spool", "a", "--file", "b"],
    ] {
        let run = tsubame(arguments);
        run.assert_code(2);
    }
}

fn write_config(directory: &Path, name: &str, text: &str) -> String {
    let path = directory.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn check_config_accepts_a_valid_file_and_summarises_it() {
    let _limit = hard_limit(Duration::from_secs(60));
    let directory = tempfile::tempdir().unwrap();
    let path = write_config(
        directory.path(),
        "good.toml",
        "[server]\nhostname = \"relay.example\"\nthreads = 2\n\n\
         [[listener]]\naddress = \"127.0.0.1:2525\"\nrelay_networks = [\"10.0.0.0/8\"]\n\n\
         [[listener]]\naddress = \"[::1]:2587\"\n\n\
         [spool]\ndirectory = \"/var/spool/tsubame\"\nsegment_size_bytes = 1048576\n\n\
         [limits]\nmax_connections = 100\nmax_connections_per_ip = 10\n\
         max_message_size_bytes = 10000\nmax_recipients = 100\nmax_command_line_bytes = 512\n\
         max_text_line_bytes = 1000\nmax_commands_per_session = 50\nmax_errors_per_session = 3\n\
         command_timeout_secs = 1\ndata_block_timeout_secs = 2\ndata_total_timeout_secs = 3\n\n\
         [log]\nlevel = \"debug\"\nformat = \"json\"\n",
    );
    let run = tsubame(&["check-config", &path]);
    run.assert_code(0);
    let stdout = run.stdout_text();
    assert_eq!(
        stdout.lines().next(),
        Some(format!("{path}: ok").as_str()),
        "{}",
        run.describe()
    );
    for fragment in [
        "127.0.0.1:2525",
        "10.0.0.0/8",
        "[::1]:2587",
        "/var/spool/tsubame",
        "10000",
    ] {
        assert!(
            stdout.contains(fragment),
            "summary lacks {fragment}: {stdout}"
        );
    }
}

/// (name, config text, line, column or 0 for any, fragment of the message)
const CONFIG_ERRORS: &[(&str, &str, usize, usize, &str)] = &[
    (
        "syntax",
        "[server]\nhostname = \"relay\"\nthreads = = 2\n",
        3,
        0,
        "",
    ),
    (
        "unknown key",
        "[[listener]]\naddress = \"127.0.0.1:25\"\n\n[limits]\nmax_recipient = 200\n",
        5,
        1,
        "max_recipient",
    ),
    (
        "wrong type",
        "[[listener]]\naddress = \"127.0.0.1:25\"\n\n[limits]\nmax_connections = \"many\"\n",
        5,
        0,
        "",
    ),
    (
        "bad address",
        "[[listener]]\naddress = \"localhost:twenty-five\"\n",
        2,
        0,
        "",
    ),
    (
        "bad network",
        "[[listener]]\naddress = \"127.0.0.1:25\"\nrelay_networks = [\"10.0.0.0/99\"]\n",
        3,
        0,
        "",
    ),
    (
        "max_recipients below 100",
        "[[listener]]\naddress = \"127.0.0.1:25\"\n\n[limits]\nmax_errors_per_session = 3\n  \
         max_recipients = 50\n",
        6,
        3,
        "max_recipients must be at least 100",
    ),
    (
        "max_text_line_bytes below 1000",
        "[[listener]]\naddress = \"127.0.0.1:25\"\n\n[limits]\nmax_text_line_bytes = 999\n",
        5,
        1,
        "max_text_line_bytes must be at least 1000",
    ),
    (
        "max_command_line_bytes below 512",
        "[[listener]]\naddress = \"127.0.0.1:25\"\n\n[limits]\nmax_command_line_bytes = 511\n",
        5,
        1,
        "max_command_line_bytes must be at least 512",
    ),
    (
        "zero limit",
        "[[listener]]\naddress = \"127.0.0.1:25\"\n\n[limits]\n\nmax_connections = 0\n",
        6,
        1,
        "max_connections must be greater than 0",
    ),
    (
        "segment too small",
        "[[listener]]\naddress = \"127.0.0.1:25\"\n\n[spool]\nsegment_size_bytes = 4096\n",
        5,
        1,
        "segment_size_bytes must be at least",
    ),
    (
        "unknown log level",
        "[[listener]]\naddress = \"127.0.0.1:25\"\n\n[log]\nlevel = \"loud\"\n",
        5,
        1,
        "unknown log level",
    ),
    (
        "no listener",
        "[server]\nthreads = 1\n",
        1,
        1,
        "at least one [[listener]] is required",
    ),
    (
        "duplicate listener",
        "[[listener]]\naddress = \"127.0.0.1:25\"\n\n[[listener]]\naddress = \"127.0.0.1:25\"\n",
        2,
        1,
        "configured twice",
    ),
];

#[test]
fn check_config_reports_errors_with_line_and_column() {
    let _limit = hard_limit(Duration::from_secs(60));
    let directory = tempfile::tempdir().unwrap();
    for (index, (name, text, line, column, fragment)) in CONFIG_ERRORS.iter().enumerate() {
        let path = write_config(directory.path(), &format!("bad{index}.toml"), text);
        let run = tsubame(&["check-config", &path]);
        assert_eq!(run.code(), Some(1), "{name}: {}", run.describe());
        let stderr = run.stderr_text();
        let prefix = format!("{path}:{line}:");
        let position = stderr
            .find(&prefix)
            .unwrap_or_else(|| panic!("{name}: expected {prefix}COLUMN: in {stderr:?}"));
        let rest = stderr.get(position + prefix.len()..).unwrap_or_default();
        let (found_column, message) = rest
            .split_once(": ")
            .unwrap_or_else(|| panic!("{name}: no `COLUMN: message` in {stderr:?}"));
        let found_column: usize = found_column
            .parse()
            .unwrap_or_else(|_| panic!("{name}: column {found_column:?} is not a number"));
        if *column != 0 {
            assert_eq!(found_column, *column, "{name}: {stderr:?}");
        }
        assert!(found_column >= 1, "{name}: columns start at 1: {stderr:?}");
        assert!(
            message.contains(fragment),
            "{name}: message should mention {fragment:?}: {stderr:?}"
        );
        assert!(run.stdout.is_empty(), "{name}: {}", run.describe());
    }
}

#[test]
fn check_config_of_a_missing_file_fails() {
    let _limit = hard_limit(Duration::from_secs(60));
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("absent.toml").display().to_string();
    let run = tsubame(&["check-config", &path]);
    run.assert_code(1);
    assert!(run.stderr_text().contains(&path), "{}", run.describe());
}

#[test]
fn serve_refuses_an_invalid_config_with_its_line() {
    let _limit = hard_limit(Duration::from_secs(60));
    let failure = Server::try_start(
        &ServerOptions::new()
            .config("[[listener]]\naddress = \"127.0.0.1:0\"\n\n[limits]\nmax_recipients = 5\n"),
    )
    .expect_err("serve started on an invalid config");
    assert_eq!(
        failure.status.and_then(|status| status.code()),
        Some(1),
        "{failure}"
    );
    assert!(
        failure
            .log
            .contains("tsubame.toml:5:1: max_recipients must be at least 100"),
        "{failure}"
    );
}

#[test]
fn serve_without_config_runs_on_the_embedded_default() {
    let _limit = hard_limit(Duration::from_secs(60));
    // The embedded default listens on 127.0.0.1:2525 and spools in ./spool: run it in
    // a fresh directory. Port 2525 must be free on the test machine.
    let directory = tempfile::tempdir().unwrap();
    let server = Server::try_start(&ServerOptions::new().bare_in(directory.path())).unwrap_or_else(
        |failure| {
            panic!(
                "`tsubame serve` on the embedded default did not start (this test needs \
                 127.0.0.1:2525 free): {failure}"
            )
        },
    );
    assert_eq!(server.address(), "127.0.0.1:2525".parse().unwrap());
    let log = server.log();
    assert!(
        log.contains("embedded default"),
        "serve should say it runs on the embedded default:\n{log}"
    );
    let message = test_message("embedded-default", "via the embedded default\n");
    let outcomes = Smtplib::new(server.address())
        .ehlo()
        .mail("default@example.com", &[])
        .rcpt("default@example.net", &[])
        .data(&message)
        .quit()
        .run();
    outcomes[3].expect(250, "2.0.0", "DATA");
    let id = outcomes[3].queued_id();
    server.stop();
    assert!(
        directory.path().join("spool").is_dir(),
        "no ./spool was created"
    );
    // `spool inspect` without --spool reads ./spool too.
    let run = tsubame_in(directory.path(), &["spool", "inspect", "--json"]);
    run.assert_code(0);
    let json: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(json["messages"][0]["id"], id.as_str(), "{json}");
}

#[test]
fn spool_inspect_takes_the_directory_from_a_config_file() {
    let _limit = hard_limit(Duration::from_secs(60));
    let directory = tempfile::tempdir().unwrap();
    let spool = directory.path().join("configured-spool");
    let config = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n\n[spool]\ndirectory = \"{}\"\n",
        spool.display()
    );
    let config_path = write_config(directory.path(), "spool.toml", &config);
    // The server spools there too.
    let server = Server::start(&ServerOptions::new().config(&config).spool(&spool));
    let id = crate::send_with_smtplib(
        server.address(),
        &test_message("configured", "configured spool\n"),
    );
    let run = tsubame(&["spool", "inspect", "--config", &config_path, "--json"]);
    run.assert_code(0);
    let json: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(json["messages"][0]["id"], id.as_str(), "{json}");
    // The table names it too.
    let table = tsubame(&["spool", "inspect", "--config", &config_path]);
    table.assert_code(0);
    assert!(
        table.stdout_text().contains(&id) && table.stdout_text().contains("1 message(s)"),
        "{}",
        table.describe()
    );
}

#[test]
fn spool_inspect_errors() {
    let _limit = hard_limit(Duration::from_secs(60));
    let directory = tempfile::tempdir().unwrap();
    let missing = directory.path().join("no-spool").display().to_string();
    tsubame(&["spool", "inspect", "--spool", &missing]).assert_code(1);

    let server = Server::start(&ServerOptions::new());
    let spool = server.spool().display().to_string();
    let run = tsubame(&["spool", "inspect", "--spool", &spool, "--show", "not-hex"]);
    run.assert_code(1);
    let run = tsubame(&[
        "spool",
        "inspect",
        "--spool",
        &spool,
        "--show",
        "00000000deadbeef",
    ]);
    run.assert_code(1);
    assert!(
        run.stderr_text().contains("00000000deadbeef"),
        "{}",
        run.describe()
    );
    // --spool and --config together are a usage error.
    tsubame(&["spool", "inspect", "--spool", &spool, "--config", "x.toml"]).assert_code(2);
}
