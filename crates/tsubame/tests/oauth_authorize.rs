//! `tsubame oauth google authorize`, run as the real binary against the token endpoint
//! peer of tsubame-oauth's tests (which also plays Google's consent page).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../oauth/tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::{PeerOptions, TokenEndpoint, browser_get, throwaway_secret};

const CLIENT_ID: &str = "test-client.apps.googleusercontent.com";
/// How long the command may take to print its URL, and to finish after the code.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The running command; killed if the test ends first.
struct Authorize {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout_lines: mpsc::Receiver<String>,
    stdout: String,
}

impl Drop for Authorize {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Authorize {
    fn start(peer: &TokenEndpoint, secret: &str, token_file: &Path, extra: &[&str]) -> Authorize {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tsubame"))
            .args(["oauth", "google", "authorize", "--client-id", CLIENT_ID])
            .args(["--client-secret-env", "TSUBAME_TEST_CLIENT_SECRET"])
            .args(["--account", "printer@example.com", "--token-file"])
            .arg(token_file)
            .arg("--auth-endpoint")
            .arg(peer.auth_endpoint().as_str())
            .arg("--token-endpoint")
            .arg(peer.token_endpoint().to_string())
            .args(["--timeout-secs", "60"])
            .args(extra)
            .env("TSUBAME_TEST_CLIENT_SECRET", secret)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (sender, stdout_lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Authorize {
            child,
            stdin,
            stdout_lines,
            stdout: String::new(),
        }
    }

    /// Reads stdout up to the line that starts with `prefix`.
    fn line_starting_with(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .stdout_lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line starting {prefix:?} in:\n{}", self.stdout));
            self.stdout.push_str(&line);
            self.stdout.push('\n');
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    /// Waits for the command to end; returns (success, stdout, stderr).
    fn finish(mut self) -> (bool, String, String) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the command did not finish:\n{}",
                self.stdout
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        while let Ok(line) = self.stdout_lines.recv_timeout(Duration::from_secs(5)) {
            self.stdout.push_str(&line);
            self.stdout.push('\n');
        }
        let mut stderr = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        (status.success(), self.stdout.clone(), stderr)
    }
}

fn start_peer() -> (TokenEndpoint, String) {
    let secret = throwaway_secret("GOCSPX");
    let peer = TokenEndpoint::start(&PeerOptions {
        client_id: CLIENT_ID.into(),
        client_secret: secret.clone(),
        ..PeerOptions::default()
    });
    (peer, secret)
}

fn check_stored(token_file: &Path, secret: &str, said: &str) {
    let mode = std::fs::metadata(token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let refresh_token = std::fs::read_to_string(token_file).unwrap();
    let refresh_token = refresh_token.trim();
    assert!(refresh_token.starts_with("1//rt-"), "{refresh_token}");
    assert!(!said.contains(refresh_token), "{said}");
    assert!(!said.contains("at-"), "no access token printed: {said}");
    assert!(!said.contains(secret), "{said}");
    // The printed configuration is what tsubame reads: parse it.
    let start = said
        .find("[[oauth]]")
        .unwrap_or_else(|| panic!("no [[oauth]] in {said}"));
    let block = &said[start..];
    let block = block
        .find("\nThe relay looks")
        .map_or(block, |end| &block[..end]);
    let config = tsubame_config::Config::parse(
        &format!("[[listener]]\naddress = \"127.0.0.1:2525\"\n{block}\n[delivery]\ndefault_upstream = \"gmail\"\n"),
        "printed",
    )
    .unwrap_or_else(|error| panic!("{error}\n{said}"));
    let source = &config.oauth_sources[0];
    assert_eq!(source.client_id.as_deref(), Some(CLIENT_ID));
    assert_eq!(
        source.token_directory.as_deref(),
        token_file.parent(),
        "{said}"
    );
    assert_eq!(
        config.upstream("gmail").unwrap().account.as_deref(),
        Some("printer@example.com")
    );
    // A token file not named as the relay expects gets a note saying where it should be.
    let expected = source.refresh_token_file("printer@example.com").unwrap();
    assert_eq!(
        said.contains("The relay looks for this account's token at"),
        expected != token_file,
        "{said}"
    );
}

#[test]
fn authorize_through_the_loopback_redirect() {
    let (peer, secret) = start_peer();
    let directory = tempfile::tempdir().unwrap();
    let token_file = directory.path().join("oauth/printer.token");
    let mut command = Authorize::start(&peer, &secret, &token_file, &[]);
    let consent = command.line_starting_with(peer.auth_endpoint().as_str());

    let (status, location, response) = browser_get(&url::Url::parse(&consent).unwrap());
    assert_eq!(status, 302, "{response}");
    let (status, _, page) = browser_get(&url::Url::parse(&location.unwrap()).unwrap());
    assert_eq!(status, 200, "{page}");

    let (success, stdout, stderr) = command.finish();
    let said = format!("{stdout}{stderr}");
    assert!(success, "{said}");
    assert!(said.contains("Received the browser's redirect"), "{said}");
    check_stored(&token_file, &secret, &said);
    let mode = std::fs::metadata(token_file.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn authorize_with_a_pasted_address() {
    let (peer, secret) = start_peer();
    let directory = tempfile::tempdir().unwrap();
    let token_file = directory.path().join("printer.token");
    let mut command = Authorize::start(&peer, &secret, &token_file, &["--no-browser-wait"]);
    let consent = command.line_starting_with(peer.auth_endpoint().as_str());
    let (_, location, _) = browser_get(&url::Url::parse(&consent).unwrap());
    let location = location.unwrap();
    // Nothing listens on the redirect address: the browser would show an error page.
    let redirect = url::Url::parse(&location).unwrap();
    assert!(std::net::TcpStream::connect(redirect.socket_addrs(|| None).unwrap()[0]).is_err());

    let mut stdin = command.stdin.take().unwrap();
    writeln!(stdin, "not a code").unwrap();
    writeln!(stdin, "{location}").unwrap();
    let (success, stdout, stderr) = command.finish();
    let said = format!("{stdout}{stderr}");
    assert!(success, "{said}");
    assert!(stderr.contains("paste again"), "{stderr}");
    check_stored(&token_file, &secret, &said);
}

#[test]
fn a_refused_consent_fails_without_a_token_file() {
    let (peer, secret) = start_peer();
    let directory = tempfile::tempdir().unwrap();
    let token_file = directory.path().join("printer.token");
    let mut command = Authorize::start(&peer, &secret, &token_file, &["--no-browser-wait"]);
    command.line_starting_with(peer.auth_endpoint().as_str());
    let mut stdin = command.stdin.take().unwrap();
    writeln!(stdin, "http://127.0.0.1:1/?error=access_denied").unwrap();
    let (success, _, stderr) = command.finish();
    assert!(!success);
    assert!(
        stderr.contains("authorisation refused: access_denied"),
        "{stderr}"
    );
    assert!(!token_file.exists());
}
