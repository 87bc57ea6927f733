//! Helpers shared by the integration tests that run real peers: child processes
//! killed on drop, free ports, aiosmtpd, and test certificates made with `openssl`.
//!
//! Peers that are missing make the tests fail, never skip: CI must install them.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use tsubame_delivery::{
    BodyType, ConnectOptions, Credentials, DeliveryError, Message, RecipientOutcome, Timeouts,
    TlsSettings, UpstreamConnection,
};

/// Every read, write and connect in these tests; the peers answer in milliseconds.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer may take to start listening.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(15);
/// Attempts at finding a free port and starting a peer on it.
pub const START_ATTEMPTS: usize = 5;

/// Kills and reaps the child when dropped, whatever the test did.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port that was free a moment ago (bind to port 0, read it, release it).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// Waits until `ready` holds or the child exits; false if it exited or time ran out.
pub fn wait_until(child: &mut ChildGuard, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + STARTUP_DEADLINE;
    while Instant::now() < deadline {
        if ready() {
            return true;
        }
        if let Ok(Some(_)) = child.0.try_wait() {
            return false;
        }
        sleep(Duration::from_millis(50));
    }
    false
}

// ---------------------------------------------------------------------------------
// aiosmtpd

pub const AIOSMTPD_SCRIPT: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/aiosmtpd_sink.py");

#[derive(Debug)]
pub struct Aiosmtpd {
    _child: ChildGuard,
    pub address: SocketAddr,
    pub dir: tempfile::TempDir,
}

fn require_aiosmtpd() {
    let check = Command::new("python3")
        .args(["-c", "import aiosmtpd"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match check {
        Ok(status) if status.success() => {}
        Ok(_) => panic!(
            "the Python module aiosmtpd is missing: pip install aiosmtpd (Debian: apt-get install python3-aiosmtpd)"
        ),
        Err(error) => panic!("python3 is missing ({error}): install it, then pip install aiosmtpd"),
    }
}

/// Starts `aiosmtpd_sink.py PORT DIR arguments...` with `environment` on a free port
/// and waits until it listens.
pub fn start_aiosmtpd(arguments: &[&str], environment: &[(&str, &str)]) -> Aiosmtpd {
    require_aiosmtpd();
    let mut last_stderr = String::new();
    for _ in 0..START_ATTEMPTS {
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = free_port();
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr log");
        let child = Command::new("python3")
            .arg(AIOSMTPD_SCRIPT)
            .arg(port.to_string())
            .arg(dir.path())
            .args(arguments)
            .envs(environment.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|error| panic!("spawn python3: {error}"));
        let mut child = ChildGuard(child);
        let ready_file = dir.path().join("ready");
        if wait_until(&mut child, || ready_file.exists()) {
            return Aiosmtpd {
                _child: child,
                address: SocketAddr::from(([127, 0, 0, 1], port)),
                dir,
            };
        }
        last_stderr = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
    }
    panic!("aiosmtpd did not start after {START_ATTEMPTS} attempts; last stderr:\n{last_stderr}");
}

impl Aiosmtpd {
    /// The envelope and exact content of the `number`th message accepted.
    pub fn received(&self, number: usize) -> (serde_json::Value, Vec<u8>) {
        let envelope_path = self.dir.path().join(format!("{number}.json"));
        let content_path = self.dir.path().join(format!("{number}.eml"));
        let deadline = Instant::now() + STARTUP_DEADLINE;
        while !envelope_path.exists() {
            assert!(Instant::now() < deadline, "message {number} never arrived");
            sleep(Duration::from_millis(20));
        }
        let envelope = std::fs::read_to_string(&envelope_path).expect("read envelope");
        let envelope = serde_json::from_str(&envelope).expect("envelope JSON");
        let content = std::fs::read(&content_path).expect("read content");
        (envelope, content)
    }

    /// Every MAIL command the server saw, one per line.
    pub fn mail_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mail.log")).unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------
// Test certificates

/// The name in the test server certificates.
pub const SERVER_NAME: &str = "mx.tsubame.test";

/// A throwaway PKI made with the `openssl` CLI in a temporary directory: a CA, a
/// server certificate it signed (for [`SERVER_NAME`] and 127.0.0.1), and an unrelated
/// self-signed one for the same names. Keys live only in the directory, which is
/// removed on drop.
#[derive(Debug)]
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub self_signed_cert: PathBuf,
    pub self_signed_key: PathBuf,
}

const OPENSSL_CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = tsubame test
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[leaf_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:mx.tsubame.test, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// Validity of the test certificates: long enough for any test run.
const VALIDITY_DAYS: &str = "2";

fn openssl(dir: &Path, arguments: &[&str]) {
    let output = Command::new("openssl")
        .args(arguments)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| {
            panic!("openssl is missing ({error}): install it (Debian: apt-get install openssl)")
        });
    assert!(
        output.status.success(),
        "openssl {arguments:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl TestPki {
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::write(dir.path().join("openssl.cnf"), OPENSSL_CONFIG).expect("openssl.cnf");
        let new_key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let config = ["-config", "openssl.cnf"];
        let mut arguments = vec!["req", "-x509"];
        arguments.extend(config);
        arguments.extend(["-extensions", "ca_ext", "-days", VALIDITY_DAYS]);
        arguments.extend(new_key);
        arguments.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=tsubame test CA",
        ]);
        openssl(dir.path(), &arguments);

        let mut arguments = vec!["req", "-new"];
        arguments.extend(config);
        arguments.extend(new_key);
        arguments.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=mx.tsubame.test",
        ]);
        openssl(dir.path(), &arguments);
        openssl(
            dir.path(),
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-set_serial",
                "2",
                "-days",
                VALIDITY_DAYS,
                "-extfile",
                "openssl.cnf",
                "-extensions",
                "leaf_ext",
                "-out",
                "server.pem",
            ],
        );

        let mut arguments = vec!["req", "-x509"];
        arguments.extend(config);
        arguments.extend(["-extensions", "leaf_ext", "-days", VALIDITY_DAYS]);
        arguments.extend(new_key);
        arguments.extend([
            "-keyout",
            "self.key",
            "-out",
            "self.pem",
            "-subj",
            "/CN=mx.tsubame.test",
        ]);
        openssl(dir.path(), &arguments);

        let path = |name: &str| dir.path().join(name);
        Self {
            ca: path("ca.pem"),
            ca_key: path("ca.key"),
            server_cert: path("server.pem"),
            server_key: path("server.key"),
            self_signed_cert: path("self.pem"),
            self_signed_key: path("self.key"),
            dir,
        }
    }

    /// aiosmtpd arguments for the CA-signed server certificate.
    pub fn server_arguments(&self) -> Vec<String> {
        vec![
            "--cert".to_owned(),
            self.server_cert.display().to_string(),
            "--key".to_owned(),
            self.server_key.display().to_string(),
        ]
    }

    /// aiosmtpd arguments for the self-signed certificate.
    pub fn self_signed_arguments(&self) -> Vec<String> {
        vec![
            "--cert".to_owned(),
            self.self_signed_cert.display().to_string(),
            "--key".to_owned(),
            self.self_signed_key.display().to_string(),
        ]
    }
}

/// The EHLO name the tests' client sends.
pub const HELO_NAME: &str = "client.tsubame.test";

/// Connects to the peer at `address` with `settings`, checking its certificate for
/// `server_name`, and authenticates with `credentials` if any.
pub fn open(
    address: SocketAddr,
    settings: &TlsSettings,
    server_name: &str,
    credentials: Option<&Credentials>,
) -> Result<UpstreamConnection, DeliveryError> {
    UpstreamConnection::open(
        address,
        &ConnectOptions {
            helo_name: HELO_NAME,
            tls: settings.mode(),
            server_name,
            tls_config: settings.config(),
            credentials,
            timeouts: Timeouts::uniform(TEST_TIMEOUT),
        },
    )
}

/// Sends `body` from a fixed sender to one recipient and asserts that it was delivered.
pub fn send(connection: &mut UpstreamConnection, body: &[u8]) {
    let recipients = vec!["rcpt@aiosmtpd.test".to_owned()];
    let result = connection
        .send(Message {
            mail_from: "sender@tsubame.test",
            recipients: &recipients,
            body_type: BodyType::EightBitMime,
            smtputf8: false,
            added_fields: &[],
            body,
        })
        .expect("send");
    for outcome in &result.outcomes {
        assert!(
            matches!(outcome, RecipientOutcome::Delivered { .. }),
            "not delivered: {outcome:?}"
        );
    }
}
