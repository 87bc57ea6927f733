//! The token endpoint peer (`tests/peers/token_endpoint.py`, Python's http.server and
//! cryptography) and throwaway keys, for the integration tests.
// Test support: each helper is used by some tests only, and a failure in one is the
// test's failure, so unwrap is what it should do.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tempfile::TempDir;
use tsubame_oauth::http::Endpoint;

/// How long the peer may take to print its port (Python and cryptography start up).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// It exits by itself after this long, should its guard never run.
const LIFETIME_SECS: u32 = 300;

/// A running token endpoint; killed when dropped.
#[derive(Debug)]
pub struct TokenEndpoint {
    child: Child,
    port: u16,
    scheme: &'static str,
    directory: TempDir,
}

/// What the peer checks and answers.
#[derive(Debug, Default)]
pub struct PeerOptions {
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
    /// The service account's public key file and key id, and its address.
    pub service_account: Option<(PathBuf, String, String)>,
    pub deny_sub: Vec<String>,
    pub expires_in: Option<u64>,
    /// Serve https with this certificate chain and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl TokenEndpoint {
    #[track_caller]
    pub fn start(options: &PeerOptions) -> TokenEndpoint {
        let directory = tempfile::Builder::new()
            .prefix("tsubame-oauth-peer-")
            .tempdir()
            .unwrap_or_else(|error| panic!("temporary directory: {error}"));
        // From the oauth crate's manifest directory or a sibling crate's (the tsubame
        // binary's tests use this module too).
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../oauth/tests/peers/token_endpoint.py");
        let mut command = Command::new("python3");
        command
            .arg(script)
            .arg("--log")
            .arg(directory.path().join("requests.jsonl"))
            .arg("--mode-file")
            .arg(directory.path().join("mode"))
            .arg("--client-id")
            .arg(&options.client_id)
            .arg("--client-secret")
            .arg(&options.client_secret)
            .arg("--refresh-token")
            .arg(&options.refresh_token)
            .arg("--hang-secs")
            .arg("20")
            .arg("--lifetime")
            .arg(LIFETIME_SECS.to_string())
            .env("PYTHONUNBUFFERED", "1")
            // Kept open by the child handle: the peer exits when it closes.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some((public_key, key_id, email)) = &options.service_account {
            command
                .arg("--public-key")
                .arg(public_key)
                .arg("--key-id")
                .arg(key_id)
                .arg("--service-account")
                .arg(email);
        }
        for sub in &options.deny_sub {
            command.arg("--deny-sub").arg(sub);
        }
        if let Some((certificate, key)) = &options.tls {
            command.arg("--cert").arg(certificate).arg("--key").arg(key);
        }
        if let Some(expires_in) = options.expires_in {
            command.arg("--expires-in").arg(expires_in.to_string());
        }
        let mut child = command.spawn().unwrap_or_else(|error| {
            panic!("python3 is needed for the token endpoint peer: {error}")
        });
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = sender.send(line);
        });
        let line = receiver.recv_timeout(STARTUP_TIMEOUT).unwrap_or_default();
        let Ok(port) = line.trim().parse() else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the token endpoint peer did not start (printed {line:?}); is the Python \
                 package cryptography installed? (scripts/test does: pip install cryptography)"
            );
        };
        TokenEndpoint {
            child,
            port,
            scheme: if options.tls.is_some() {
                "https"
            } else {
                "http"
            },
            directory,
        }
    }

    pub fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn token_endpoint(&self) -> Endpoint {
        Endpoint::parse(&format!("{}://127.0.0.1:{}/token", self.scheme, self.port)).unwrap()
    }

    pub fn auth_endpoint(&self) -> url::Url {
        url::Url::parse(&format!("http://127.0.0.1:{}/auth", self.port)).unwrap()
    }

    /// "ok", "invalid_grant", "unauthorized_client", "500" or "hang".
    pub fn set_mode(&self, mode: &str) {
        std::fs::write(self.directory.path().join("mode"), mode).unwrap();
    }

    /// Every request the peer logged, oldest first.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        match std::fs::read_to_string(self.directory.path().join("requests.jsonl")) {
            Ok(text) => text
                .lines()
                .map(|line| serde_json::from_str(line).unwrap())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The POSTs to /token the peer logged.
    pub fn token_requests(&self) -> Vec<serde_json::Value> {
        self.requests()
            .into_iter()
            .filter(|request| request["path"] == "/token")
            .collect()
    }
}

impl Drop for TokenEndpoint {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The e2e tests' service-account key (a throwaway RSA key made with openssl).
// Not every test binary that includes this module uses each re-export.
#[allow(unused_imports)]
pub use tsubame_tests::oauth::ServiceAccountKey;

/// A secret made up for one test run.
// Not every test binary that includes this module uses each re-export.
#[allow(unused_imports)]
pub use tsubame_tests::oauth::throwaway_secret;

/// One GET like a browser's: returns the status code and the Location header.
pub fn browser_get(url: &url::Url) -> (u16, Option<String>, String) {
    let address = url.socket_addrs(|| None).unwrap()[0];
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(10)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut target = url.path().to_string();
    if let Some(query) = url.query() {
        target.push('?');
        target.push_str(query);
    }
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .get(9..12)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let location = response
        .lines()
        .find_map(|line| line.strip_prefix("Location: "))
        .map(str::to_string);
    (status, location, response)
}

/// A throwaway CA and a server certificate for 127.0.0.1.
// Not every test binary that includes this module uses each re-export.
#[allow(unused_imports)]
pub use tsubame_tests::pki::TestPki;
