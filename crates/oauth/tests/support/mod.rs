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

/// A throwaway 2048-bit RSA key made with `openssl genpkey`, and its public half.
#[derive(Debug)]
pub struct ServiceAccountKey {
    directory: TempDir,
    pub key_id: String,
}

fn openssl(directory: &Path, arguments: &[&str]) {
    let output = Command::new("openssl")
        .current_dir(directory)
        .args(arguments)
        .output()
        .unwrap_or_else(|error| panic!("openssl is missing ({error}): apt-get install openssl"));
    assert!(
        output.status.success(),
        "openssl {arguments:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl ServiceAccountKey {
    #[track_caller]
    pub fn generate(key_id: &str) -> ServiceAccountKey {
        let directory = tempfile::Builder::new()
            .prefix("tsubame-oauth-key-")
            .tempdir()
            .unwrap();
        openssl(
            directory.path(),
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "key.pem",
            ],
        );
        openssl(
            directory.path(),
            &["pkey", "-in", "key.pem", "-pubout", "-out", "public.pem"],
        );
        ServiceAccountKey {
            directory,
            key_id: key_id.to_string(),
        }
    }

    pub fn public_key_path(&self) -> PathBuf {
        self.directory.path().join("public.pem")
    }

    /// What [`PeerOptions::service_account`] needs to check this key's assertions.
    pub fn peer_option(&self, client_email: &str) -> Option<(PathBuf, String, String)> {
        Some((
            self.public_key_path(),
            self.key_id.clone(),
            client_email.to_string(),
        ))
    }

    /// The JSON key file Google would issue for this key.
    pub fn key_file_json(&self, client_email: &str, token_uri: &str) -> String {
        let private_key = std::fs::read_to_string(self.directory.path().join("key.pem")).unwrap();
        serde_json::json!({
            "type": "service_account",
            "project_id": "tsubame-test",
            "private_key_id": self.key_id,
            "private_key": private_key,
            "client_email": client_email,
            "client_id": "100000000000000000000",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "universe_domain": "googleapis.com",
        })
        .to_string()
    }

    /// Writes the key file (mode 0600) and returns its path.
    pub fn write_key_file(&self, client_email: &str, token_uri: &str) -> PathBuf {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.directory.path().join("service-account.json");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        file.write_all(self.key_file_json(client_email, token_uri).as_bytes())
            .unwrap();
        path
    }
}

/// A random-looking string for a throwaway test secret.
pub fn throwaway_secret(prefix: &str) -> String {
    use std::hash::{BuildHasher, RandomState};
    let value = RandomState::new().hash_one(std::time::SystemTime::now());
    format!("{prefix}-{value:016x}")
}

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

/// A throwaway CA and a server certificate for 127.0.0.1 it signed (P-256 keys, made
/// with `openssl`).
#[derive(Debug)]
pub struct TestCa {
    directory: TempDir,
}

impl TestCa {
    #[track_caller]
    pub fn generate() -> TestCa {
        let directory = tempfile::Builder::new()
            .prefix("tsubame-oauth-ca-")
            .tempdir()
            .unwrap();
        let path = directory.path();
        std::fs::write(
            path.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(key);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=tsubame oauth test CA",
        ]);
        openssl(path, &ca);
        let mut request = vec!["req"];
        request.extend(key);
        request.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        openssl(path, &request);
        openssl(
            path,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        );
        TestCa { directory }
    }

    pub fn ca(&self) -> PathBuf {
        self.directory.path().join("ca.pem")
    }

    /// The server's (certificate, key) PEM files.
    pub fn server(&self) -> (PathBuf, PathBuf) {
        (
            self.directory.path().join("server.pem"),
            self.directory.path().join("server.key"),
        )
    }
}
