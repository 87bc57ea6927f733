//! Shared helpers for tsubame's end-to-end tests.
//!
//! Every test drives the real `tsubame` binary over loopback. The SMTP peers are programs
//! nobody here wrote: Python's `smtplib` (through the scripts in `tests/peers/`) and
//! `swaks`. The raw socket client ([`smtp::RawClient`]) is only for byte sequences no
//! real client produces: smuggling inputs, a whole transaction in one write, BDAT.
//! [`tls_client::TlsClient`] is its counterpart over TLS (STARTTLS or implicit), through
//! Python's ssl module; `openssl s_client` ([`peers::openssl_s_client`]) checks what a
//! TLS listener serves.
//!
//! Nothing here may hang or leave a process behind:
//! * every child process is a [`process::ChildGuard`], killed and reaped when dropped and
//!   recorded so that the watchdog can kill it;
//! * every wait has a deadline and every socket a read timeout;
//! * every test starts with [`process::hard_limit`], a watchdog that, should the test
//!   overrun anyway, kills all children and ends the test binary with a clear message.
//!
//! A missing peer (python3, swaks) or a missing binary is a test failure with a message
//! that says what to install or build; no test skips itself.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a server gets to print its `listening` line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a server gets to stop after SIGTERM: its grace period for sessions waiting
/// on a commit (10 s, `SHUTDOWN_GRACE` in crates/server) plus the time deliveries in
/// progress get (`[delivery] shutdown_timeout_secs`, 30 s by default).
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(45);
/// Read timeout of raw SMTP connections: far above any reply delay of a healthy server.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// Timeout of one CLI run (`check-config`, `spool inspect`, a swaks or smtplib session).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The directory of this package (`tests/`).
pub fn tests_directory() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The workspace root.
pub fn workspace_directory() -> PathBuf {
    tests_directory()
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// `\r`, `\n`, non-ASCII and control bytes made visible, for assertion messages.
pub fn escape(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

/// Asserts two byte strings are equal, showing both escaped when they are not.
#[track_caller]
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    if actual != expected {
        let first_difference = actual
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .unwrap_or(actual.len().min(expected.len()));
        panic!(
            "{what}: bytes differ (first difference at byte {first_difference}; {} vs {} bytes)\n  \
             actual:   \"{}\"\n  expected: \"{}\"",
            actual.len(),
            expected.len(),
            escape(actual),
            escape(expected)
        );
    }
}

/// A message's content as its client sent it: what tsubame stored or delivered, minus
/// the one Received header (RFC 5321 §4.4) tsubame puts on top. Panics when that header
/// is missing, malformed, or there twice.
#[track_caller]
pub fn without_received(content: &[u8]) -> &[u8] {
    let shown = || escape(content.get(..content.len().min(300)).unwrap_or_default());
    assert!(
        content.starts_with(b"Received: from "),
        "no Received header on top: \"{}\"",
        shown()
    );
    // The header ends at the first CRLF not followed by folding white space.
    let end = content
        .windows(3)
        .position(|window| {
            window[0] == b'\r' && window[1] == b'\n' && window[2] != b'\t' && window[2] != b' '
        })
        .map(|position| position + 2)
        .unwrap_or_else(|| panic!("Received header does not end: \"{}\"", shown()));
    let header = String::from_utf8_lossy(&content[..end]);
    assert!(
        header.contains(" (tsubame) with ") && header.trim_end().ends_with("+0000"),
        "not tsubame's Received header: {header:?}"
    );
    let rest = &content[end..];
    assert!(
        !(rest.starts_with(b"Received: from ")
            && String::from_utf8_lossy(rest)
                .lines()
                .take(3)
                .any(|line| line.contains("(tsubame)"))),
        "tsubame's Received header twice: \"{}\"",
        shown()
    );
    rest
}

/// Text with every `\n` turned into `\r\n` (test messages are written with `\n`).
pub fn crlf(text: &str) -> Vec<u8> {
    text.replace('\n', "\r\n").into_bytes()
}

/// Child processes, command runs with deadlines, signals and the per-test watchdog.
pub mod process {
    use std::collections::BTreeSet;
    use std::io::{Read, Write};
    use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
    use std::sync::mpsc::{self, RecvTimeoutError};
    use std::sync::{Mutex, MutexGuard, PoisonError};
    use std::thread::{self, JoinHandle};
    use std::time::{Duration, Instant};

    pub use rustix::process::Signal;

    /// Pids of children spawned and not yet reaped, for the watchdog.
    static LIVE_CHILDREN: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

    fn live_children() -> MutexGuard<'static, BTreeSet<u32>> {
        LIVE_CHILDREN.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `signal` to a process.
    pub fn send_signal(pid: u32, signal: Signal) -> std::io::Result<()> {
        let pid = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or_else(|| std::io::Error::other(format!("{pid} is not a valid pid")))?;
        rustix::process::kill_process(pid, signal).map_err(std::io::Error::from)
    }

    /// A child process that is killed (SIGKILL) and reaped when dropped.
    #[derive(Debug)]
    pub struct ChildGuard {
        child: Child,
        /// What the child is, for messages.
        what: String,
        /// Set once the child was reaped; after that its pid may belong to another
        /// process and is never signalled again.
        status: Option<ExitStatus>,
    }

    impl ChildGuard {
        /// Spawns `command`. A spawn failure (a missing program) fails the test.
        #[track_caller]
        pub fn spawn(command: &mut Command, what: impl Into<String>) -> ChildGuard {
            let what = what.into();
            let mut children = live_children();
            let child = command
                .spawn()
                .unwrap_or_else(|error| panic!("cannot start {what} ({command:?}): {error}"));
            children.insert(child.id());
            drop(children);
            ChildGuard {
                child,
                what,
                status: None,
            }
        }

        pub fn id(&self) -> u32 {
            self.child.id()
        }

        pub fn what(&self) -> &str {
            &self.what
        }

        pub fn take_stdin(&mut self) -> Option<ChildStdin> {
            self.child.stdin.take()
        }

        pub fn take_stdout(&mut self) -> Option<ChildStdout> {
            self.child.stdout.take()
        }

        pub fn take_stderr(&mut self) -> Option<ChildStderr> {
            self.child.stderr.take()
        }

        fn reaped(&mut self, status: ExitStatus) -> ExitStatus {
            live_children().remove(&self.child.id());
            self.status = Some(status);
            status
        }

        /// The exit status if the child has exited.
        pub fn try_wait(&mut self) -> Option<ExitStatus> {
            if let Some(status) = self.status {
                return Some(status);
            }
            match self.child.try_wait() {
                Ok(Some(status)) => Some(self.reaped(status)),
                Ok(None) => None,
                Err(error) => panic!("cannot wait for {}: {error}", self.what),
            }
        }

        /// Waits up to `timeout` for the child to exit.
        pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
            let deadline = Instant::now() + timeout;
            loop {
                if let Some(status) = self.try_wait() {
                    return Some(status);
                }
                if Instant::now() >= deadline {
                    return None;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }

        /// Signals the child unless it was already reaped.
        pub fn signal(&mut self, signal: Signal) {
            if self.try_wait().is_some() {
                return;
            }
            if let Err(error) = send_signal(self.id(), signal) {
                panic!("cannot send {signal:?} to {}: {error}", self.what);
            }
        }

        /// SIGKILL, then reap. Returns the exit status.
        pub fn kill(&mut self) -> ExitStatus {
            if let Some(status) = self.try_wait() {
                return status;
            }
            // Ignore the error: the child may have exited between try_wait and kill.
            let _ = self.child.kill();
            match self.child.wait() {
                Ok(status) => self.reaped(status),
                Err(error) => panic!("cannot reap {}: {error}", self.what),
            }
        }
    }

    impl Drop for ChildGuard {
        fn drop(&mut self) {
            if self.status.is_none() {
                let _ = self.child.kill();
                if let Ok(status) = self.child.wait() {
                    self.reaped(status);
                }
            }
        }
    }

    /// A finished command.
    #[derive(Debug)]
    pub struct Finished {
        pub what: String,
        pub status: ExitStatus,
        pub stdout: Vec<u8>,
        pub stderr: Vec<u8>,
    }

    impl Finished {
        pub fn code(&self) -> Option<i32> {
            self.status.code()
        }

        pub fn stdout_text(&self) -> String {
            String::from_utf8_lossy(&self.stdout).into_owned()
        }

        pub fn stderr_text(&self) -> String {
            String::from_utf8_lossy(&self.stderr).into_owned()
        }

        /// Everything about the run, for assertion messages.
        pub fn describe(&self) -> String {
            format!(
                "{} exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.what,
                self.status,
                self.stdout_text(),
                self.stderr_text()
            )
        }

        /// Asserts the exit code.
        #[track_caller]
        pub fn assert_code(&self, code: i32) -> &Self {
            assert_eq!(
                self.code(),
                Some(code),
                "expected exit code {code}: {}",
                self.describe()
            );
            self
        }
    }

    fn collect<R: Read + Send + 'static>(reader: Option<R>) -> JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut reader) = reader {
                let _ = reader.read_to_end(&mut bytes);
            }
            bytes
        })
    }

    /// Runs `command` to completion with `stdin` as its input, killing it (and failing
    /// the test) if it takes longer than `timeout`.
    #[track_caller]
    pub fn run(
        command: &mut Command,
        stdin: Option<&[u8]>,
        timeout: Duration,
        what: &str,
    ) -> Finished {
        command
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(command, what);
        let writer = child.take_stdin().map(|mut pipe| {
            let input = stdin.unwrap_or_default().to_vec();
            thread::spawn(move || {
                // A child that exits without reading all of its input is its own
                // business; its exit status tells.
                let _ = pipe.write_all(&input);
            })
        });
        let stdout = collect(child.take_stdout());
        let stderr = collect(child.take_stderr());
        let status = child.wait_timeout(timeout);
        let timed_out = status.is_none();
        let status = status.unwrap_or_else(|| child.kill());
        if let Some(writer) = writer {
            let _ = writer.join();
        }
        let finished = Finished {
            what: what.to_string(),
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        };
        assert!(
            !timed_out,
            "{what} did not finish within {timeout:?} and was killed\n{}",
            finished.describe()
        );
        finished
    }

    /// Looks a program up on PATH.
    pub fn find_program(name: &str) -> Option<std::path::PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|directory| directory.join(name))
            .find(|candidate| candidate.is_file())
    }

    /// A per-test watchdog; see [`hard_limit`].
    #[derive(Debug)]
    pub struct HardLimit {
        _cancel: mpsc::Sender<()>,
    }

    /// Starts the watchdog of the calling test: if the returned guard is not dropped
    /// within `limit`, every live child is killed and the test binary exits with
    /// status 124. Every other wait in these helpers has its own deadline, so this only
    /// fires on a bug in a test; it guarantees that no run hangs and no server outlives
    /// the tests.
    ///
    /// The tsubame binary is located (and built if needed) before the clock starts.
    pub fn hard_limit(limit: Duration) -> HardLimit {
        let _ = crate::binary::tsubame();
        let name = thread::current()
            .name()
            .unwrap_or("an unnamed test")
            .to_string();
        let (cancel, cancelled) = mpsc::channel::<()>();
        thread::spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = cancelled.recv_timeout(limit) {
                // Straight to the stderr stream: libtest's capture of `eprintln!` would
                // swallow the message when the process exits here.
                let _ = writeln!(
                    std::io::stderr(),
                    "\nHARD LIMIT: test {name} ran longer than {limit:?}; killing every child \
                     process and ending the test binary"
                );
                for pid in live_children().iter() {
                    let _ = send_signal(*pid, Signal::KILL);
                }
                std::process::exit(124);
            }
        });
        HardLimit { _cancel: cancel }
    }
}

/// Finding (and building) the `tsubame` binary.
pub mod binary {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::OnceLock;
    use std::time::Duration;

    use crate::process::run;

    /// Building the binary from scratch on a 2-core machine takes a few minutes.
    const BUILD_TIMEOUT: Duration = Duration::from_secs(15 * 60);

    /// The `tsubame` binary under test.
    ///
    /// `TSUBAME_BIN`, when set, names it. Otherwise the binary is built with the cargo
    /// that runs the tests (`cargo build -p tsubame --bin tsubame`, a no-op when it is
    /// fresh, as after `scripts/test`'s workspace build), so that `cargo test -p
    /// tsubame-tests` never tests a stale binary, and its path is taken from cargo's own
    /// report. A missing binary fails the test with a message saying how to build it.
    pub fn tsubame() -> &'static Path {
        static BINARY: OnceLock<PathBuf> = OnceLock::new();
        BINARY.get_or_init(locate)
    }

    fn locate() -> PathBuf {
        if let Some(path) = std::env::var_os("TSUBAME_BIN") {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "TSUBAME_BIN names {}, which does not exist",
                path.display()
            );
            return path;
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let manifest = crate::workspace_directory().join("Cargo.toml");
        let mut command = Command::new(cargo);
        command
            .arg("build")
            .arg("--manifest-path")
            .arg(&manifest)
            .args(["-p", "tsubame", "--bin", "tsubame", "--message-format=json"]);
        if !cfg!(debug_assertions) {
            command.arg("--release");
        }
        let build = run(&mut command, None, BUILD_TIMEOUT, "cargo build -p tsubame");
        let built = build.stdout_text().lines().find_map(|line| {
            let message: serde_json::Value = serde_json::from_str(line).ok()?;
            if message["reason"] != "compiler-artifact" || message["target"]["name"] != "tsubame" {
                return None;
            }
            message["executable"].as_str().map(PathBuf::from)
        });
        match built {
            Some(path) if build.status.success() && path.is_file() => path,
            _ => panic!(
                "the tsubame binary could not be built; build it with `cargo build -p tsubame` \
                 (scripts/test does) or set TSUBAME_BIN\n{}",
                build.describe()
            ),
        }
    }
}

/// Running `tsubame serve`.
pub mod server {
    use std::io::{BufRead, BufReader};
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::process::{Command, ExitStatus, Stdio};
    use std::sync::mpsc::{self, RecvTimeoutError};
    use std::sync::{Arc, Mutex, PoisonError};
    use std::thread;
    use std::time::Instant;

    use tempfile::TempDir;

    use crate::process::{ChildGuard, Signal};
    use crate::{SHUTDOWN_TIMEOUT, STARTUP_TIMEOUT};

    /// How to start a server.
    #[derive(Debug, Clone)]
    pub struct ServerOptions {
        config: Option<String>,
        spool: Option<PathBuf>,
        current_directory: Option<PathBuf>,
        /// Pass `--listen 127.0.0.1:0` and `--spool`. Off only for the embedded-default
        /// test, which runs `tsubame serve` with no arguments at all.
        overrides: bool,
        /// Deliver what is accepted. Off by default: the accept-path tests look at the
        /// spool's records, which delivery's journal records would interleave, and must
        /// not depend on DNS; they run `serve --hold`.
        deliver: bool,
        extra_arguments: Vec<String>,
        environment: Vec<(String, String)>,
    }

    impl Default for ServerOptions {
        fn default() -> Self {
            Self::new()
        }
    }

    impl ServerOptions {
        /// Listen on a free loopback port, spool in a fresh temporary directory.
        pub fn new() -> Self {
            Self {
                config: None,
                spool: None,
                current_directory: None,
                overrides: true,
                deliver: false,
                extra_arguments: Vec::new(),
                environment: Vec::new(),
            }
        }

        /// Run with this configuration (TOML text, written to a temporary file).
        /// `--listen` and `--spool` still override its listeners and spool directory.
        pub fn config(mut self, toml: &str) -> Self {
            self.config = Some(toml.to_string());
            self
        }

        /// Spool in `directory` (which outlives the server, for restart tests).
        pub fn spool(mut self, directory: &Path) -> Self {
            self.spool = Some(directory.to_path_buf());
            self
        }

        /// One more command-line argument after `serve`.
        pub fn arg(mut self, argument: &str) -> Self {
            self.extra_arguments.push(argument.to_string());
            self
        }

        /// An environment variable for the server (an upstream password).
        pub fn env(mut self, key: &str, value: &str) -> Self {
            self.environment.push((key.to_string(), value.to_string()));
            self
        }

        /// Deliver accepted mail (no `--hold`).
        pub fn deliver(mut self) -> Self {
            self.deliver = true;
            self
        }

        /// Run in `directory` with no `--listen`/`--spool` overrides.
        pub fn bare_in(mut self, directory: &Path) -> Self {
            self.current_directory = Some(directory.to_path_buf());
            self.overrides = false;
            self
        }
    }

    /// Why a server did not start.
    #[derive(Debug)]
    pub struct StartFailure {
        /// `None` when it was still running at the deadline (it has been killed).
        pub status: Option<ExitStatus>,
        pub log: String,
    }

    impl std::fmt::Display for StartFailure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self.status {
                Some(status) => write!(f, "tsubame serve exited with {status} before listening")?,
                None => write!(
                    f,
                    "tsubame serve did not log a `listening` line within {STARTUP_TIMEOUT:?}"
                )?,
            }
            write!(f, "\n--- server log ---\n{}", self.log)
        }
    }

    /// A running `tsubame serve`, killed (SIGKILL) when dropped.
    #[derive(Debug)]
    pub struct Server {
        child: ChildGuard,
        address: SocketAddr,
        spool: PathBuf,
        /// Everything the server wrote to stderr so far, ANSI escapes removed.
        log: Arc<Mutex<String>>,
        /// The configuration file the server was started with (`--config`), if any.
        config: Option<PathBuf>,
        /// Holds the config file and, when the test gave none, the spool directory.
        _scratch: TempDir,
    }

    impl Server {
        /// Starts a server and waits for its `listening` line; fails the test if it
        /// does not come.
        #[track_caller]
        pub fn start(options: &ServerOptions) -> Server {
            Self::try_start(options).unwrap_or_else(|failure| panic!("{failure}"))
        }

        /// Starts a server and waits for its `listening` line, the port it names, or its
        /// exit.
        pub fn try_start(options: &ServerOptions) -> Result<Server, StartFailure> {
            let scratch = tempfile::Builder::new()
                .prefix("tsubame-e2e-")
                .tempdir()
                .unwrap_or_else(|error| panic!("cannot create a temporary directory: {error}"));
            let mut command = Command::new(crate::binary::tsubame());
            command.arg("serve");
            let mut config_path = None;
            if let Some(config) = &options.config {
                let path = scratch.path().join("tsubame.toml");
                std::fs::write(&path, config)
                    .unwrap_or_else(|error| panic!("cannot write {}: {error}", path.display()));
                command.arg("--config").arg(&path);
                config_path = Some(path);
            }
            let spool = match (&options.spool, &options.current_directory) {
                (Some(spool), _) => spool.clone(),
                (None, Some(directory)) => directory.join("spool"),
                (None, None) => scratch.path().join("spool"),
            };
            if options.overrides {
                command
                    .args(["--listen", "127.0.0.1:0", "--spool"])
                    .arg(&spool);
                if !options.deliver {
                    command.arg("--hold");
                }
            }
            command.args(&options.extra_arguments);
            if let Some(directory) = &options.current_directory {
                command.current_dir(directory);
            }
            command
                .env_remove("RUST_LOG")
                .env("NO_COLOR", "1")
                .envs(options.environment.iter().map(|(key, value)| (key, value)))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let mut child = ChildGuard::spawn(&mut command, "tsubame serve");
            let log = Arc::new(Mutex::new(String::new()));
            let (lines_sender, lines) = mpsc::channel::<String>();
            let stderr = child.take_stderr();
            let log_writer = Arc::clone(&log);
            thread::spawn(move || {
                let Some(stderr) = stderr else { return };
                let mut reader = BufReader::new(stderr);
                let mut raw = Vec::new();
                loop {
                    raw.clear();
                    match reader.read_until(b'\n', &mut raw) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    let line = strip_ansi(&String::from_utf8_lossy(&raw));
                    log_writer
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push_str(&line);
                    // The receiver is gone once the server is up; keep collecting.
                    let _ = lines_sender.send(line);
                }
            });
            let deadline = Instant::now() + STARTUP_TIMEOUT;
            let read_log = |log: &Arc<Mutex<String>>| {
                log.lock().unwrap_or_else(PoisonError::into_inner).clone()
            };
            loop {
                let remaining = deadline.saturating_duration_since(Instant::now());
                match lines.recv_timeout(remaining) {
                    Ok(line) => {
                        if let Some(address) = listening_address(&line) {
                            return Ok(Server {
                                child,
                                address,
                                spool,
                                log,
                                config: config_path,
                                _scratch: scratch,
                            });
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        // stderr closed: the server exited (or closed it, which is as bad).
                        let status = child.wait_timeout(STARTUP_TIMEOUT);
                        if status.is_none() {
                            child.kill();
                        }
                        return Err(StartFailure {
                            status,
                            log: read_log(&log),
                        });
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        child.kill();
                        return Err(StartFailure {
                            status: None,
                            log: read_log(&log),
                        });
                    }
                }
            }
        }

        pub fn address(&self) -> SocketAddr {
            self.address
        }

        pub fn port(&self) -> u16 {
            self.address.port()
        }

        pub fn spool(&self) -> &Path {
            &self.spool
        }

        pub fn pid(&self) -> u32 {
            self.child.id()
        }

        /// Replaces the configuration file the server started with (for a SIGHUP
        /// reload); fails the test when it started without one.
        #[track_caller]
        pub fn rewrite_config(&self, toml: &str) {
            let path = self
                .config
                .as_ref()
                .unwrap_or_else(|| panic!("the server was started without --config"));
            // Written beside and renamed, as an editor or a deployment tool does: the
            // server never reads half a file.
            let partial = path.with_extension("toml.partial");
            std::fs::write(&partial, toml)
                .unwrap_or_else(|error| panic!("cannot write {}: {error}", partial.display()));
            std::fs::rename(&partial, path)
                .unwrap_or_else(|error| panic!("cannot replace {}: {error}", path.display()));
        }

        /// What the server logged so far.
        pub fn log(&self) -> String {
            self.log
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        }

        /// The exit status if the server has exited.
        pub fn try_wait(&mut self) -> Option<ExitStatus> {
            self.child.try_wait()
        }

        /// Graceful stop: SIGTERM, then wait. Fails the test if it does not exit in
        /// time (it is then killed).
        #[track_caller]
        pub fn terminate(mut self) -> ExitStatus {
            self.child.signal(Signal::TERM);
            match self.child.wait_timeout(SHUTDOWN_TIMEOUT) {
                Some(status) => status,
                None => {
                    self.child.kill();
                    panic!(
                        "tsubame serve did not stop within {SHUTDOWN_TIMEOUT:?} of SIGTERM\n\
                         --- server log ---\n{}",
                        self.log()
                    );
                }
            }
        }

        /// Graceful stop that must succeed: SIGTERM, then exit status 0.
        #[track_caller]
        pub fn stop(self) {
            let log = self.log.clone();
            let status = self.terminate();
            assert!(
                status.success(),
                "tsubame serve exited with {status} after SIGTERM\n--- server log ---\n{}",
                log.lock().unwrap_or_else(PoisonError::into_inner)
            );
        }

        /// SIGTERM without waiting; see [`Server::wait_exit`].
        pub fn send_terminate(&mut self) {
            self.child.signal(Signal::TERM);
        }

        /// Waits for the exit after [`Server::send_terminate`].
        #[track_caller]
        pub fn wait_exit(mut self) -> ExitStatus {
            match self.child.wait_timeout(SHUTDOWN_TIMEOUT) {
                Some(status) => status,
                None => {
                    self.child.kill();
                    panic!(
                        "tsubame serve did not stop within {SHUTDOWN_TIMEOUT:?}\n\
                         --- server log ---\n{}",
                        self.log()
                    );
                }
            }
        }

        /// Crash: SIGKILL, then reap.
        pub fn kill(mut self) {
            self.child.kill();
        }
    }

    /// The address in a `listening address=127.0.0.1:PORT` log line.
    fn listening_address(line: &str) -> Option<SocketAddr> {
        if !line.contains("listening") {
            return None;
        }
        let start = line.find("address=")? + "address=".len();
        let value = line.get(start..)?.split_whitespace().next()?;
        value.trim_matches('"').parse().ok()
    }

    /// Removes ANSI escape sequences (`ESC [ ... letter`), in case colours are on.
    fn strip_ansi(text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut characters = text.chars();
        while let Some(character) = characters.next() {
            if character == '\u{1b}' {
                for next in characters.by_ref() {
                    if next.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(character);
            }
        }
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn finds_the_listening_address() {
            let line = "2026-11-26T06:40:00.123Z  INFO tsubame_server: listening \
                        address=127.0.0.1:34567 threads=2\n";
            assert_eq!(
                listening_address(line),
                Some("127.0.0.1:34567".parse().unwrap())
            );
            let coloured = "\u{1b}[32m INFO\u{1b}[0m listening \u{1b}[3maddress\u{1b}[0m\
                            \u{1b}[2m=\u{1b}[0m127.0.0.1:80 \u{1b}[3mthreads\u{1b}[0m=1";
            assert_eq!(
                listening_address(&strip_ansi(coloured)),
                Some("127.0.0.1:80".parse().unwrap())
            );
            assert_eq!(listening_address("spool recovered queued=0"), None);
        }
    }
}

/// A raw SMTP client over a std `TcpStream`, for inputs no real client produces.
pub mod smtp {
    use std::io::{ErrorKind, Read, Write};
    use std::net::{IpAddr, SocketAddr, TcpStream};
    use std::time::{Duration, Instant};

    use socket2::{Domain, Protocol, SockAddr, Socket, Type};

    use crate::REPLY_TIMEOUT;

    /// One (possibly multi-line) SMTP reply.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Reply {
        pub code: u16,
        /// The text of each line, after `NNN-` / `NNN `.
        pub lines: Vec<String>,
    }

    impl Reply {
        /// All lines joined with `\n`.
        pub fn text(&self) -> String {
            self.lines.join("\n")
        }

        /// The enhanced status code (RFC 3463) at the start of the last line, if any.
        pub fn enhanced(&self) -> Option<&str> {
            let first = self.lines.last()?.split_whitespace().next()?;
            let parts: Vec<&str> = first.split('.').collect();
            let numeric = parts.len() == 3
                && parts
                    .iter()
                    .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()));
            numeric.then_some(first)
        }

        /// Whether the reply has this code and enhanced code.
        pub fn is(&self, code: u16, enhanced: &str) -> bool {
            self.code == code && self.enhanced() == Some(enhanced)
        }

        /// The id in `250 2.0.0 Ok: queued as <id>`.
        pub fn queued_id(&self) -> Option<String> {
            queued_id(&self.text())
        }
    }

    impl std::fmt::Display for Reply {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            for (index, line) in self.lines.iter().enumerate() {
                let separator = if index + 1 == self.lines.len() {
                    ' '
                } else {
                    '-'
                };
                if index > 0 {
                    f.write_str(" / ")?;
                }
                write!(f, "{}{separator}{line}", self.code)?;
            }
            Ok(())
        }
    }

    /// The 16-hex-digit id after `queued as ` in a reply text.
    pub fn queued_id(text: &str) -> Option<String> {
        let start = text.find("queued as ")? + "queued as ".len();
        let id: String = text
            .get(start..)?
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .collect();
        (id.len() == 16).then(|| id.to_ascii_lowercase())
    }

    /// What reading the next reply gave.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Next {
        Reply(Reply),
        /// The server closed the connection (EOF or reset).
        Closed,
        TimedOut,
    }

    /// A raw SMTP connection.
    #[derive(Debug)]
    pub struct RawClient {
        stream: TcpStream,
        /// Received bytes not yet parsed into replies.
        buffer: Vec<u8>,
        /// The server closed the connection; set once EOF or a reset was seen.
        closed: bool,
    }

    impl RawClient {
        /// Connects from the default source address.
        #[track_caller]
        pub fn connect(address: SocketAddr) -> RawClient {
            let stream = TcpStream::connect_timeout(&address, REPLY_TIMEOUT)
                .unwrap_or_else(|error| panic!("cannot connect to {address}: {error}"));
            Self::from_stream(stream)
        }

        /// Connects from `source` (e.g. 127.0.0.2), with an ephemeral port.
        #[track_caller]
        pub fn connect_from(address: SocketAddr, source: IpAddr) -> RawClient {
            let socket = Socket::new(
                Domain::for_address(address),
                Type::STREAM,
                Some(Protocol::TCP),
            )
            .unwrap_or_else(|error| panic!("cannot create a socket: {error}"));
            socket
                .bind(&SockAddr::from(SocketAddr::new(source, 0)))
                .unwrap_or_else(|error| panic!("cannot bind to {source}: {error}"));
            socket
                .connect_timeout(&SockAddr::from(address), REPLY_TIMEOUT)
                .unwrap_or_else(|error| {
                    panic!("cannot connect to {address} from {source}: {error}")
                });
            Self::from_stream(socket.into())
        }

        fn from_stream(stream: TcpStream) -> RawClient {
            let _ = stream.set_nodelay(true);
            RawClient {
                stream,
                buffer: Vec::new(),
                closed: false,
            }
        }

        /// Writes `bytes` (all of them, in one write call where the kernel allows).
        #[track_caller]
        pub fn send(&mut self, bytes: &[u8]) {
            self.stream
                .set_write_timeout(Some(REPLY_TIMEOUT))
                .unwrap_or_else(|error| panic!("cannot set a write timeout: {error}"));
            self.stream
                .write_all(bytes)
                .unwrap_or_else(|error| panic!("cannot send {:?}: {error}", crate::escape(bytes)));
        }

        /// Like [`RawClient::send`], but a failure (the server closed) is returned.
        pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            self.stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
            self.stream.write_all(bytes)
        }

        /// Parses one complete reply from the buffer, if there is one.
        fn parse_buffered(&mut self) -> Option<Reply> {
            let mut lines = Vec::new();
            let mut code = None;
            let mut position = 0;
            loop {
                let rest = self.buffer.get(position..)?;
                let end = rest.windows(2).position(|pair| pair == b"\r\n")?;
                let line = String::from_utf8_lossy(rest.get(..end)?).into_owned();
                position += end + 2;
                let line_code: u16 = line
                    .get(..3)
                    .and_then(|digits| digits.parse().ok())
                    .unwrap_or_else(|| panic!("malformed reply line {line:?}"));
                if let Some(code) = code {
                    assert_eq!(
                        code, line_code,
                        "reply code changed within a reply: {line:?}"
                    );
                }
                code = Some(line_code);
                let separator = line.as_bytes().get(3).copied();
                lines.push(line.get(4..).unwrap_or_default().to_string());
                match separator {
                    Some(b'-') => continue,
                    None | Some(b' ') => break,
                    Some(other) => panic!(
                        "malformed reply line {line:?} (separator {:?})",
                        other as char
                    ),
                }
            }
            self.buffer.drain(..position);
            code.map(|code| Reply { code, lines })
        }

        /// Reads the next reply, waiting at most `timeout`.
        pub fn next(&mut self, timeout: Duration) -> Next {
            let deadline = Instant::now() + timeout;
            loop {
                if let Some(reply) = self.parse_buffered() {
                    return Next::Reply(reply);
                }
                if self.closed {
                    return Next::Closed;
                }
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    return Next::TimedOut;
                }
                self.stream
                    .set_read_timeout(Some(remaining))
                    .unwrap_or_else(|error| panic!("cannot set a read timeout: {error}"));
                let mut chunk = [0_u8; 16 * 1024];
                match self.stream.read(&mut chunk) {
                    Ok(0) => self.closed = true,
                    Ok(length) => self
                        .buffer
                        .extend_from_slice(chunk.get(..length).unwrap_or_default()),
                    Err(error)
                        if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                    {
                        return Next::TimedOut;
                    }
                    Err(error) if error.kind() == ErrorKind::Interrupted => {}
                    Err(error)
                        if matches!(
                            error.kind(),
                            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                        ) =>
                    {
                        self.closed = true
                    }
                    Err(error) => panic!("cannot read from the server: {error}"),
                }
            }
        }

        /// Reads the next reply; fails the test on EOF or timeout.
        #[track_caller]
        pub fn reply(&mut self) -> Reply {
            match self.next(REPLY_TIMEOUT) {
                Next::Reply(reply) => reply,
                other => panic!(
                    "expected a reply, got {other:?}; unparsed bytes: \"{}\"",
                    crate::escape(&self.buffer)
                ),
            }
        }

        /// Sends `line` + CRLF and reads the reply.
        #[track_caller]
        pub fn command(&mut self, line: &str) -> Reply {
            self.send(format!("{line}\r\n").as_bytes());
            self.reply()
        }

        /// Reads the next reply and asserts its code and enhanced code.
        #[track_caller]
        pub fn expect(&mut self, code: u16, enhanced: &str, what: &str) -> Reply {
            let reply = self.reply();
            assert!(
                reply.is(code, enhanced),
                "{what}: expected {code} {enhanced}, got {reply}"
            );
            reply
        }

        /// Sends `line` + CRLF and asserts the reply's code and enhanced code.
        #[track_caller]
        pub fn command_expect(&mut self, line: &str, code: u16, enhanced: &str) -> Reply {
            self.send(format!("{line}\r\n").as_bytes());
            self.expect(code, enhanced, line)
        }

        /// Reads the greeting (220).
        #[track_caller]
        pub fn greeting(&mut self) -> Reply {
            let reply = self.reply();
            assert_eq!(reply.code, 220, "greeting: {reply}");
            reply
        }

        /// Greeting, then EHLO; returns the EHLO reply.
        #[track_caller]
        pub fn hello(&mut self) -> Reply {
            self.greeting();
            let reply = self.command("EHLO raw.tsubame.test");
            assert_eq!(reply.code, 250, "EHLO: {reply}");
            reply
        }

        /// Asserts nothing arrives for `duration` and the connection stays open.
        #[track_caller]
        pub fn assert_silent(&mut self, duration: Duration, what: &str) {
            match self.next(duration) {
                Next::TimedOut => {}
                other => panic!("{what}: expected no reply yet, got {other:?}"),
            }
        }

        /// Asserts the server closes the connection within `timeout` with no further
        /// reply.
        #[track_caller]
        pub fn expect_closed(&mut self, timeout: Duration, what: &str) {
            match self.next(timeout) {
                Next::Closed => {}
                other => {
                    panic!("{what}: expected the server to close the connection, got {other:?}")
                }
            }
        }
    }
}

/// A raw SMTP client whose connection can be TLS: plain and then STARTTLS, or TLS from
/// the first byte (RFC 8314). The TLS side is Python's `ssl` module (OpenSSL), driven step
/// by step through `tests/peers/smtp_session.py`, so that a test controls every byte
/// (commands pipelined behind STARTTLS, AUTH exchanges) and the time of every reply.
pub mod tls_client {
    use std::io::{BufRead, BufReader, Write};
    use std::net::{IpAddr, SocketAddr};
    use std::path::{Path, PathBuf};
    use std::process::{ChildStdin, Command, Stdio};
    use std::sync::mpsc::{self, Receiver};
    use std::thread;
    use std::time::{Duration, Instant};

    use serde_json::{Value, json};

    use crate::REPLY_TIMEOUT;
    use crate::peers::{hex, peer_script, python3, unhex};
    use crate::process::ChildGuard;
    use crate::smtp::{Next, Reply};

    /// Margin over a step's own timeout for the Python process to answer; it only runs
    /// out if the peer itself is stuck.
    const PEER_MARGIN: Duration = Duration::from_secs(10);

    /// What a TLS handshake gave.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct TlsInfo {
        /// `TLSv1.2` or `TLSv1.3`, as OpenSSL names it.
        pub version: String,
        /// The cipher suite, as OpenSSL names it (`TLS_AES_256_GCM_SHA384`).
        pub cipher: String,
        /// The common name of the server certificate's subject.
        pub peer_common_name: Option<String>,
    }

    /// What STARTTLS's handshake gave.
    #[derive(Debug, Clone)]
    pub struct Handshake {
        /// The session, or why the handshake failed.
        pub result: Result<TlsInfo, String>,
        /// Bytes that arrived in clear text after the reply to STARTTLS, before the
        /// handshake: replies to commands the server should have discarded.
        pub leftover: Vec<u8>,
    }

    /// How to connect.
    #[derive(Debug, Clone)]
    pub struct TlsClientOptions {
        /// TLS from the first byte.
        pub implicit_tls: bool,
        /// The CA the server certificate is verified against.
        pub ca_file: PathBuf,
        /// The name the certificate must be valid for (its SAN has 127.0.0.1).
        pub server_hostname: String,
        /// Connect from this address (e.g. 127.0.0.2) instead of the default.
        pub source: Option<IpAddr>,
    }

    impl TlsClientOptions {
        /// Plain first (STARTTLS later), verified against `ca_file` for 127.0.0.1.
        pub fn new(ca_file: &Path) -> Self {
            Self {
                implicit_tls: false,
                ca_file: ca_file.to_path_buf(),
                server_hostname: "127.0.0.1".to_string(),
                source: None,
            }
        }

        pub fn implicit(mut self) -> Self {
            self.implicit_tls = true;
            self
        }

        pub fn source(mut self, source: IpAddr) -> Self {
            self.source = Some(source);
            self
        }
    }

    /// One connection, killed (with its Python process) when dropped.
    #[derive(Debug)]
    pub struct TlsClient {
        child: ChildGuard,
        stdin: ChildStdin,
        /// The peer's answers, one JSON text per line.
        answers: Receiver<String>,
        /// The session of an implicit-TLS connection or after STARTTLS.
        tls: Option<TlsInfo>,
    }

    fn tls_info(value: &Value) -> Option<TlsInfo> {
        if value.is_null() {
            return None;
        }
        Some(TlsInfo {
            version: value["version"].as_str().unwrap_or_default().to_string(),
            cipher: value["cipher"].as_str().unwrap_or_default().to_string(),
            peer_common_name: value["peer_subject"]["commonName"]
                .as_str()
                .map(str::to_string),
        })
    }

    impl TlsClient {
        /// Connects; fails the test if the connection (or the implicit-TLS handshake)
        /// fails.
        #[track_caller]
        pub fn connect(address: SocketAddr, options: &TlsClientOptions) -> TlsClient {
            Self::try_connect(address, options).unwrap_or_else(|error| {
                panic!(
                    "cannot connect to {address} (implicit TLS: {}): {error}",
                    options.implicit_tls
                )
            })
        }

        /// Connects, or says why it could not (a refused implicit-TLS handshake).
        #[track_caller]
        pub fn try_connect(
            address: SocketAddr,
            options: &TlsClientOptions,
        ) -> Result<TlsClient, String> {
            let mut command = Command::new(python3());
            command
                .arg(peer_script("smtp_session.py"))
                .env("PYTHONUNBUFFERED", "1")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut child = ChildGuard::spawn(&mut command, "python3 smtp_session.py");
            let stdin = child
                .take_stdin()
                .unwrap_or_else(|| panic!("smtp_session.py: no stdin"));
            let stdout = child
                .take_stdout()
                .unwrap_or_else(|| panic!("smtp_session.py: no stdout"));
            let (sender, answers) = mpsc::channel();
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { return };
                    if sender.send(line).is_err() {
                        return;
                    }
                }
            });
            let mut client = TlsClient {
                child,
                stdin,
                answers,
                tls: None,
            };
            let answer = client.call(
                json!({
                    "op": "connect",
                    "host": address.ip().to_string(),
                    "port": address.port(),
                    "source": options.source.map(|source| source.to_string()),
                    "implicit_tls": options.implicit_tls,
                    "ca_file": options.ca_file,
                    "server_hostname": options.server_hostname,
                    "timeout_secs": REPLY_TIMEOUT.as_secs_f64(),
                }),
                REPLY_TIMEOUT,
            );
            if let Some(error) = answer["error"].as_str() {
                return Err(error.to_string());
            }
            client.tls = tls_info(&answer["tls"]);
            Ok(client)
        }

        /// Sends one request and waits (at most `timeout` plus a margin) for its answer.
        #[track_caller]
        fn call(&mut self, request: Value, timeout: Duration) -> Value {
            let mut line = request.to_string();
            line.push('\n');
            if let Err(error) = self
                .stdin
                .write_all(line.as_bytes())
                .and_then(|()| self.stdin.flush())
            {
                panic!(
                    "cannot talk to {} ({error}); did it crash?",
                    self.child.what()
                );
            }
            let answer = self
                .answers
                .recv_timeout(timeout + PEER_MARGIN)
                .unwrap_or_else(|error| {
                    panic!(
                        "{} gave no answer to {request} within {:?}: {error}",
                        self.child.what(),
                        timeout + PEER_MARGIN
                    )
                });
            serde_json::from_str(&answer)
                .unwrap_or_else(|error| panic!("smtp_session.py said {answer:?}: {error}"))
        }

        /// The TLS session, if the connection is encrypted.
        pub fn tls(&self) -> Option<&TlsInfo> {
            self.tls.as_ref()
        }

        /// Writes `bytes` in one `sendall`.
        #[track_caller]
        pub fn send(&mut self, bytes: &[u8]) {
            let answer = self.call(json!({"op": "send", "hex": hex(bytes)}), REPLY_TIMEOUT);
            if let Some(error) = answer["error"].as_str() {
                panic!("cannot send \"{}\": {error}", crate::escape(bytes));
            }
        }

        /// Reads the next reply, waiting at most `timeout`.
        #[track_caller]
        pub fn next(&mut self, timeout: Duration) -> Next {
            let answer = self.call(
                json!({"op": "reply", "timeout_secs": timeout.as_secs_f64()}),
                timeout,
            );
            if answer["timeout"] == true {
                return Next::TimedOut;
            }
            if answer["closed"] == true {
                return Next::Closed;
            }
            if let Some(error) = answer["error"].as_str() {
                panic!("reading a reply: {error}");
            }
            let reply = &answer["reply"];
            Next::Reply(Reply {
                code: reply["code"]
                    .as_u64()
                    .and_then(|code| u16::try_from(code).ok())
                    .unwrap_or_else(|| panic!("reply without a code: {answer}")),
                lines: reply["lines"]
                    .as_array()
                    .map(|lines| {
                        lines
                            .iter()
                            .map(|line| line.as_str().unwrap_or_default().to_string())
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        }

        /// Reads the next reply; fails the test on EOF or timeout.
        #[track_caller]
        pub fn reply(&mut self) -> Reply {
            match self.next(REPLY_TIMEOUT) {
                Next::Reply(reply) => reply,
                other => panic!("expected a reply, got {other:?}"),
            }
        }

        /// Sends `line` + CRLF and reads the reply.
        #[track_caller]
        pub fn command(&mut self, line: &str) -> Reply {
            self.send(format!("{line}\r\n").as_bytes());
            self.reply()
        }

        /// Sends `line` + CRLF and reads the reply, timing it from the send.
        #[track_caller]
        pub fn timed_command(&mut self, line: &str) -> (Reply, Duration) {
            let started = Instant::now();
            let reply = self.command(line);
            (reply, started.elapsed())
        }

        /// Reads the next reply and asserts its code and enhanced code.
        #[track_caller]
        pub fn expect(&mut self, code: u16, enhanced: &str, what: &str) -> Reply {
            let reply = self.reply();
            assert!(
                reply.is(code, enhanced),
                "{what}: expected {code} {enhanced}, got {reply}"
            );
            reply
        }

        /// Sends `line` + CRLF and asserts the reply's code and enhanced code.
        #[track_caller]
        pub fn command_expect(&mut self, line: &str, code: u16, enhanced: &str) -> Reply {
            self.send(format!("{line}\r\n").as_bytes());
            self.expect(code, enhanced, line)
        }

        /// Reads the greeting (220).
        #[track_caller]
        pub fn greeting(&mut self) -> Reply {
            let reply = self.reply();
            assert_eq!(reply.code, 220, "greeting: {reply}");
            reply
        }

        /// Sends `EHLO name` and returns its (250) reply.
        #[track_caller]
        pub fn ehlo(&mut self, name: &str) -> Reply {
            let reply = self.command(&format!("EHLO {name}"));
            assert_eq!(reply.code, 250, "EHLO: {reply}");
            reply
        }

        /// Sends STARTTLS, expects `220 2.0.0`, and does the handshake; fails the test
        /// if either fails. Returns the session.
        #[track_caller]
        pub fn starttls(&mut self) -> TlsInfo {
            let reply = self.command("STARTTLS");
            assert!(
                reply.is(220, "2.0.0"),
                "STARTTLS: expected 220 2.0.0, got {reply}"
            );
            let handshake = self.handshake();
            assert!(
                handshake.leftover.is_empty(),
                "clear-text bytes after the reply to STARTTLS: \"{}\"",
                crate::escape(&handshake.leftover)
            );
            handshake
                .result
                .unwrap_or_else(|error| panic!("TLS handshake after STARTTLS failed: {error}"))
        }

        /// The TLS handshake now, on whatever was sent before (for tests that send
        /// STARTTLS themselves, with more behind it).
        #[track_caller]
        pub fn handshake(&mut self) -> Handshake {
            let answer = self.call(json!({"op": "starttls"}), REPLY_TIMEOUT);
            let leftover = unhex(answer["leftover_hex"].as_str().unwrap_or_default());
            let result = match answer["error"].as_str() {
                Some(error) => Err(error.to_string()),
                None => tls_info(&answer["tls"]).ok_or_else(|| format!("no session: {answer}")),
            };
            if let Ok(info) = &result {
                self.tls = Some(info.clone());
            }
            Handshake { result, leftover }
        }

        /// Asserts nothing arrives for `duration` and the connection stays open.
        #[track_caller]
        pub fn assert_silent(&mut self, duration: Duration, what: &str) {
            match self.next(duration) {
                Next::TimedOut => {}
                other => panic!("{what}: expected nothing, got {other:?}"),
            }
        }
    }
}

/// `tsubame spool inspect`, `tsubame check-config` and other CLI runs.
pub mod cli {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::process::Command;
    use std::sync::{Mutex, PoisonError};

    use serde_json::Value;

    use crate::COMMAND_TIMEOUT;
    use crate::process::{Finished, run};

    /// Runs `tsubame ARGS...`.
    #[track_caller]
    pub fn tsubame(arguments: &[&str]) -> Finished {
        let mut command = Command::new(crate::binary::tsubame());
        command
            .args(arguments)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1");
        run(
            &mut command,
            None,
            COMMAND_TIMEOUT,
            &format!("tsubame {}", arguments.join(" ")),
        )
    }

    /// Runs `tsubame ARGS...` in `directory`.
    #[track_caller]
    pub fn tsubame_in(directory: &Path, arguments: &[&str]) -> Finished {
        let mut command = Command::new(crate::binary::tsubame());
        command
            .args(arguments)
            .current_dir(directory)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1");
        run(
            &mut command,
            None,
            COMMAND_TIMEOUT,
            &format!(
                "tsubame {} (in {})",
                arguments.join(" "),
                directory.display()
            ),
        )
    }

    /// `tsubame user add NAME --users-file FILE --password-stdin`, the password given on
    /// standard input; fails the test unless it succeeds.
    #[track_caller]
    pub fn user_add(users_file: &Path, name: &str, password: &str) {
        let mut command = Command::new(crate::binary::tsubame());
        command
            .args(["user", "add", name, "--users-file"])
            .arg(users_file)
            .arg("--password-stdin")
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1");
        let input = format!("{password}\n");
        run(
            &mut command,
            Some(input.as_bytes()),
            COMMAND_TIMEOUT,
            &format!("tsubame user add {name}"),
        )
        .assert_code(0);
    }

    /// The argon2id hash (PHC string) that `tsubame user add` stores for `password`,
    /// for `password_hash = "..."` in a test's `[[user]]` entries. Hashing is slow on
    /// purpose, so each password is hashed once per test binary.
    #[track_caller]
    pub fn password_hash(password: &str) -> String {
        static HASHES: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());
        if let Some(hash) = HASHES
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(password)
        {
            return hash.clone();
        }
        let directory = tempfile::Builder::new()
            .prefix("tsubame-users-")
            .tempdir()
            .unwrap_or_else(|error| panic!("temporary directory: {error}"));
        let file = directory.path().join("users.toml");
        user_add(&file, "hash-only", password);
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|error| panic!("{}: {error}", file.display()));
        // `password_hash = "$argon2id$..."`: the PHC alphabet (base64, `$`, `,`, `=`)
        // needs no TOML escaping, so the quoted text is the hash.
        let hash = text
            .lines()
            .find_map(|line| {
                let value = line.trim().strip_prefix("password_hash")?.trim_start();
                let value = value.strip_prefix('=')?.trim();
                Some(value.trim_matches('"').to_string())
            })
            .filter(|hash| hash.starts_with("$argon2id$"))
            .unwrap_or_else(|| panic!("no argon2id password_hash in the users file:\n{text}"));
        HASHES
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(password.to_string(), hash.clone());
        hash
    }

    /// What `spool inspect --json` reported.
    #[derive(Debug)]
    pub struct Inspection {
        pub run: Finished,
        pub json: Value,
    }

    impl Inspection {
        pub fn exit_code(&self) -> Option<i32> {
            self.run.code()
        }

        pub fn messages(&self) -> &[Value] {
            self.json["messages"].as_array().map_or(&[], Vec::as_slice)
        }

        pub fn quarantined(&self) -> &[Value] {
            self.json["quarantined"]
                .as_array()
                .map_or(&[], Vec::as_slice)
        }

        pub fn torn_tails(&self) -> &[Value] {
            self.json["torn_tails"]
                .as_array()
                .map_or(&[], Vec::as_slice)
        }

        pub fn ids(&self) -> Vec<String> {
            self.messages()
                .iter()
                .filter_map(|message| message["id"].as_str().map(str::to_string))
                .collect()
        }

        pub fn message(&self, id: &str) -> Option<&Value> {
            self.messages()
                .iter()
                .find(|message| message["id"].as_str() == Some(id))
        }

        /// The message with `id`; fails the test when it is not listed.
        #[track_caller]
        pub fn expect_message(&self, id: &str) -> &Value {
            self.message(id).unwrap_or_else(|| {
                panic!(
                    "message {id} is not in the spool; spool inspect --json said:\n{}",
                    self.json
                )
            })
        }
    }

    /// `tsubame spool inspect --spool DIR --json`. Fails the test unless it exits 0 or
    /// 3 with valid JSON.
    #[track_caller]
    pub fn inspect(spool: &Path) -> Inspection {
        let spool_text = spool.display().to_string();
        let run = tsubame(&["spool", "inspect", "--spool", &spool_text, "--json"]);
        assert!(
            matches!(run.code(), Some(0 | 3)),
            "spool inspect failed: {}",
            run.describe()
        );
        let json: Value = serde_json::from_slice(&run.stdout).unwrap_or_else(|error| {
            panic!(
                "spool inspect --json printed invalid JSON ({error}): {}",
                run.describe()
            )
        });
        Inspection { run, json }
    }

    /// `tsubame queue list --json --spool DIR`. Fails the test unless it exits 0 with
    /// valid JSON.
    #[track_caller]
    pub fn queue_list(spool: &Path) -> Value {
        let spool_text = spool.display().to_string();
        let run = tsubame(&["queue", "list", "--json", "--spool", &spool_text]);
        run.assert_code(0);
        serde_json::from_str(&run.stdout_text())
            .unwrap_or_else(|error| panic!("queue list --json: {error}\n{}", run.describe()))
    }

    /// What `spool inspect --show ID` printed.
    #[derive(Debug)]
    pub struct Shown {
        /// The envelope lines (`id: ...`, `from: <...>`, `to: <...>`, ...).
        pub envelope: Vec<String>,
        /// The stored content, byte-exact.
        pub content: Vec<u8>,
    }

    impl Shown {
        /// The values of the envelope lines named `key` (`to` may repeat).
        pub fn field(&self, key: &str) -> Vec<&str> {
            let prefix = format!("{key}: ");
            self.envelope
                .iter()
                .filter_map(|line| line.strip_prefix(&prefix))
                .collect()
        }
    }

    /// `tsubame spool inspect --spool DIR --show ID`: envelope, blank line, content.
    #[track_caller]
    pub fn show(spool: &Path, id: &str) -> Shown {
        let spool_text = spool.display().to_string();
        let run = tsubame(&["spool", "inspect", "--spool", &spool_text, "--show", id]);
        assert!(
            matches!(run.code(), Some(0 | 3)),
            "spool inspect --show {id} failed: {}",
            run.describe()
        );
        let split = run
            .stdout
            .windows(2)
            .position(|pair| pair == b"\n\n")
            .unwrap_or_else(|| {
                panic!(
                    "spool inspect --show printed no blank line after the envelope: {}",
                    run.describe()
                )
            });
        let envelope = String::from_utf8_lossy(run.stdout.get(..split).unwrap_or_default())
            .lines()
            .map(str::to_string)
            .collect();
        let content = run.stdout.get(split + 2..).unwrap_or_default().to_vec();
        Shown { envelope, content }
    }
}

/// The real peers: Python's smtplib and swaks.
pub mod peers {
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::OnceLock;
    use std::time::Duration;

    use serde_json::{Value, json};

    use crate::COMMAND_TIMEOUT;
    use crate::process::{Finished, find_program, run};

    /// `python3`, or a failed test saying it is needed.
    pub fn python3() -> &'static PathBuf {
        static PYTHON: OnceLock<PathBuf> = OnceLock::new();
        PYTHON.get_or_init(|| {
            find_program("python3").unwrap_or_else(|| {
                panic!(
                    "python3 is not on PATH: the end-to-end tests use Python's smtplib as an \
                     SMTP client. Install python3 (scripts/test does: apt-get install python3)"
                )
            })
        })
    }

    /// `swaks`, or a failed test saying it is needed.
    pub fn swaks_program() -> &'static PathBuf {
        static SWAKS: OnceLock<PathBuf> = OnceLock::new();
        SWAKS.get_or_init(|| {
            find_program("swaks").unwrap_or_else(|| {
                panic!(
                    "swaks is not on PATH: the end-to-end tests use it as an SMTP client. \
                     Install it (scripts/test does: apt-get install swaks)"
                )
            })
        })
    }

    /// A script in `tests/peers/`.
    pub fn peer_script(name: &str) -> PathBuf {
        crate::tests_directory().join("peers").join(name)
    }

    /// Runs a Python peer script with a JSON job on stdin.
    #[track_caller]
    pub fn run_python(script: &str, job: &Value, timeout: Duration) -> Finished {
        let mut command = Command::new(python3());
        command
            .arg(peer_script(script))
            .env("PYTHONUNBUFFERED", "1");
        run(
            &mut command,
            Some(job.to_string().as_bytes()),
            timeout,
            &format!("python3 {script}"),
        )
    }

    /// One smtplib session: a list of actions run in order on one connection
    /// (`tests/peers/smtp_client.py`).
    #[derive(Debug, Clone)]
    pub struct Smtplib {
        address: SocketAddr,
        source_address: Option<String>,
        /// Connect with `smtplib.SMTP_SSL` (TLS from the first byte, RFC 8314).
        implicit_tls: bool,
        /// The CA that TLS (implicit or STARTTLS) verifies the server's certificate with.
        ca_file: Option<PathBuf>,
        actions: Vec<Value>,
    }

    /// The outcome of one smtplib call.
    #[derive(Debug, Clone)]
    pub struct Outcome {
        pub code: Option<u16>,
        pub message: String,
        /// The exception smtplib raised, if any (`SMTPSenderRefused`, ...).
        pub exception: Option<String>,
        pub raw: Value,
    }

    impl Outcome {
        /// The enhanced status code at the start of the message.
        pub fn enhanced(&self) -> Option<&str> {
            let first = self.message.split_whitespace().next()?;
            (first.split('.').count() == 3).then_some(first)
        }

        pub fn is(&self, code: u16, enhanced: &str) -> bool {
            self.code == Some(code) && self.enhanced() == Some(enhanced)
        }

        #[track_caller]
        pub fn expect(&self, code: u16, enhanced: &str, what: &str) -> &Self {
            assert!(
                self.is(code, enhanced),
                "{what}: expected {code} {enhanced}, got {}",
                self.raw
            );
            self
        }

        /// The queued-as id of a 250 after DATA.
        #[track_caller]
        pub fn queued_id(&self) -> String {
            crate::smtp::queued_id(&self.message)
                .unwrap_or_else(|| panic!("no `queued as <id>` in {}", self.raw))
        }
    }

    impl Smtplib {
        pub fn new(address: SocketAddr) -> Self {
            Self {
                address,
                source_address: None,
                implicit_tls: false,
                ca_file: None,
                actions: Vec::new(),
            }
        }

        /// Verify the server's TLS certificate against this CA (PEM).
        pub fn tls_ca(mut self, ca_file: &Path) -> Self {
            self.ca_file = Some(ca_file.to_path_buf());
            self
        }

        /// TLS from the first byte (`smtplib.SMTP_SSL`), verified against
        /// [`Smtplib::tls_ca`].
        pub fn implicit_tls(mut self) -> Self {
            self.implicit_tls = true;
            self
        }

        /// `SMTP.starttls(context)`, verified against [`Smtplib::tls_ca`]; the outcome's
        /// `raw["tls"]` holds the negotiated version and cipher.
        pub fn starttls(self) -> Self {
            self.action(json!({"op": "starttls"}))
        }

        /// `SMTP.login(user, password)`: smtplib picks the mechanism (PLAIN before LOGIN)
        /// and, on a 535, tries the next one it knows before it raises.
        pub fn login(self, user: &str, password: &str) -> Self {
            self.action(json!({"op": "login", "user": user, "password": password}))
        }

        pub fn helo(self) -> Self {
            self.action(json!({"op": "helo"}))
        }

        /// Bind the client to this source address (`source_address=(ip, 0)`).
        pub fn source(mut self, ip: &str) -> Self {
            self.source_address = Some(ip.to_string());
            self
        }

        fn action(mut self, action: Value) -> Self {
            self.actions.push(action);
            self
        }

        pub fn ehlo(self) -> Self {
            self.action(json!({"op": "ehlo"}))
        }

        pub fn mail(self, from: &str, options: &[&str]) -> Self {
            self.action(json!({"op": "mail", "from": from, "options": options}))
        }

        pub fn rcpt(self, to: &str, options: &[&str]) -> Self {
            self.action(json!({"op": "rcpt", "to": to, "options": options}))
        }

        /// `SMTP.data(message)`: smtplib dot-stuffs and adds the terminator.
        pub fn data(self, message: &[u8]) -> Self {
            self.action(json!({"op": "data", "message_hex": hex(message)}))
        }

        /// `SMTP.sendmail(...)`: EHLO if needed, MAIL (with SIZE= when advertised), RCPT,
        /// DATA, raising on refusal.
        pub fn sendmail(
            self,
            from: &str,
            to: &[&str],
            message: &[u8],
            mail_options: &[&str],
        ) -> Self {
            self.action(json!({
                "op": "sendmail", "from": from, "to": to, "message_hex": hex(message),
                "mail_options": mail_options,
            }))
        }

        pub fn verify(self, address: &str) -> Self {
            self.action(json!({"op": "verify", "address": address}))
        }

        pub fn noop(self) -> Self {
            self.action(json!({"op": "noop"}))
        }

        pub fn rset(self) -> Self {
            self.action(json!({"op": "rset"}))
        }

        pub fn quit(self) -> Self {
            self.action(json!({"op": "quit"}))
        }

        /// Like [`Smtplib::run`], and fails the test unless every action gave an outcome
        /// (smtplib stops at a dropped connection), so that outcomes can be indexed.
        #[track_caller]
        pub fn run_to_end(self) -> Vec<Outcome> {
            let count = self.actions.len();
            let outcomes = self.run();
            if outcomes.len() != count {
                let said: Vec<String> = outcomes
                    .iter()
                    .map(|outcome| outcome.raw.to_string())
                    .collect();
                panic!(
                    "the smtplib session ended after {} of its {count} actions:\n{}",
                    outcomes.len(),
                    said.join("\n")
                );
            }
            outcomes
        }

        /// Runs the session; fails the test if the connection could not be made.
        #[track_caller]
        pub fn run(self) -> Vec<Outcome> {
            let job = json!({
                "host": self.address.ip().to_string(),
                "port": self.address.port(),
                "source_address": self.source_address,
                "implicit_tls": self.implicit_tls,
                "ca_file": self.ca_file,
                "timeout_secs": 20,
                "actions": self.actions,
            });
            let finished = run_python("smtp_client.py", &job, COMMAND_TIMEOUT);
            finished.assert_code(0);
            let output: Value = serde_json::from_slice(&finished.stdout).unwrap_or_else(|error| {
                panic!(
                    "smtp_client.py printed invalid JSON ({error}): {}",
                    finished.describe()
                )
            });
            if let Some(error) = output["connect_error"].as_str() {
                panic!("smtplib could not connect to {}: {error}", self.address);
            }
            output["results"]
                .as_array()
                .map(|results| results.iter().map(outcome).collect())
                .unwrap_or_default()
        }
    }

    fn outcome(value: &Value) -> Outcome {
        Outcome {
            code: value["code"]
                .as_u64()
                .and_then(|code| u16::try_from(code).ok()),
            message: value["message"].as_str().unwrap_or_default().to_string(),
            exception: value["exception"].as_str().map(str::to_string),
            raw: value.clone(),
        }
    }

    /// Lower-case hex of `bytes`.
    pub fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// Bytes from hex; fails the test on bad input.
    #[track_caller]
    pub fn unhex(text: &str) -> Vec<u8> {
        assert!(text.len().is_multiple_of(2), "odd-length hex");
        (0..text.len())
            .step_by(2)
            .map(|index| {
                text.get(index..index + 2)
                    .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                    .unwrap_or_else(|| panic!("bad hex at {index}"))
            })
            .collect()
    }

    /// Runs swaks with `arguments`.
    #[track_caller]
    pub fn swaks(arguments: &[&str]) -> Finished {
        let mut command = Command::new(swaks_program());
        command.args(arguments);
        run(
            &mut command,
            None,
            COMMAND_TIMEOUT,
            &format!("swaks {}", arguments.join(" ")),
        )
    }

    /// `openssl s_client ARGS...` with its standard input closed, so that it ends right
    /// after the handshake (and, with `-starttls smtp`, the SMTP exchange before it).
    /// The certificate and session it saw are on its standard output.
    #[track_caller]
    pub fn openssl_s_client(arguments: &[&str]) -> Finished {
        let program = find_program("openssl")
            .unwrap_or_else(|| panic!("openssl is not on PATH: apt-get install openssl"));
        let mut command = Command::new(program);
        command.arg("s_client").args(arguments);
        run(
            &mut command,
            None,
            COMMAND_TIMEOUT,
            &format!("openssl s_client {}", arguments.join(" ")),
        )
    }

    /// The message content swaks sent, reconstructed from its transcript: the ` -> `
    /// lines between the 354 reply and the lone `.`, dot-unstuffed, each ended by CRLF.
    /// That is exactly what the server must store.
    #[track_caller]
    pub fn swaks_sent_content(transcript: &str) -> Vec<u8> {
        let mut content = Vec::new();
        let mut in_data = false;
        for line in transcript.lines() {
            if !in_data {
                in_data = line.starts_with("<-  354");
                continue;
            }
            let Some(sent) = line.strip_prefix(" -> ") else {
                // swaks prints "-> " without content for an empty line in some versions.
                if line == " ->" {
                    content.extend_from_slice(b"\r\n");
                    continue;
                }
                panic!("unexpected transcript line inside DATA: {line:?}\n{transcript}");
            };
            if sent == "." {
                return content;
            }
            let unstuffed = sent.strip_prefix('.').unwrap_or(sent);
            content.extend_from_slice(unstuffed.as_bytes());
            content.extend_from_slice(b"\r\n");
        }
        panic!("no complete DATA section in the swaks transcript:\n{transcript}");
    }

    /// The queued-as id in a swaks transcript.
    #[track_caller]
    pub fn swaks_queued_id(transcript: &str) -> String {
        transcript
            .lines()
            .filter(|line| line.starts_with("<-  250"))
            .find_map(crate::smtp::queued_id)
            .unwrap_or_else(|| {
                panic!("no `queued as <id>` reply in the swaks transcript:\n{transcript}")
            })
    }
}

/// Upstreams that tsubame delivers to in the tests: aiosmtpd (`tests/peers/upstream.py`)
/// and Postfix's `smtp-sink`.
pub mod upstream {
    use std::net::{SocketAddr, TcpListener};
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use serde_json::Value;
    use tempfile::TempDir;

    use crate::peers::{peer_script, python3};
    use crate::process::{ChildGuard, find_program};

    /// How long an upstream gets to start listening.
    pub const UPSTREAM_STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

    /// A free TCP port on 127.0.0.1 (bound and released: a tiny race, acceptable here).
    pub fn free_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|error| panic!("cannot bind a port on loopback: {error}"));
        listener
            .local_addr()
            .unwrap_or_else(|error| panic!("local_addr: {error}"))
            .port()
    }

    /// Polls `condition` every 20 ms until it holds or `timeout` passes.
    pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if condition() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A message the upstream stored.
    #[derive(Clone)]
    pub struct Received {
        pub envelope: Value,
        pub content: Vec<u8>,
    }

    impl std::fmt::Debug for Received {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{} {}", self.envelope, crate::escape(&self.content))
        }
    }

    impl Received {
        /// The envelope sender; empty for the null sender (aiosmtpd reports it as `<>`).
        pub fn mail_from(&self) -> &str {
            match self.envelope["mail_from"].as_str().unwrap_or("") {
                "<>" => "",
                address => address,
            }
        }

        pub fn recipients(&self) -> Vec<String> {
            self.envelope["rcpt_tos"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .filter_map(|value| value.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        }

        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.content).into_owned()
        }
    }

    /// aiosmtpd running `tests/peers/upstream.py`, killed when dropped.
    #[derive(Debug)]
    pub struct Aiosmtpd {
        _child: ChildGuard,
        address: SocketAddr,
        outdir: TempDir,
    }

    impl Aiosmtpd {
        /// Starts on 127.0.0.1 and a free port with the peer's options (`--reject A`,
        /// `--defer-first N`, ...).
        #[track_caller]
        pub fn start(options: &[&str]) -> Aiosmtpd {
            Self::start_on(SocketAddr::from(([127, 0, 0, 1], free_port())), options)
        }

        #[track_caller]
        pub fn start_on(address: SocketAddr, options: &[&str]) -> Aiosmtpd {
            Self::start_with_env(address, options, &[])
        }

        /// With environment variables for the peer (the login `--auth` accepts).
        #[track_caller]
        pub fn start_with_env(
            address: SocketAddr,
            options: &[&str],
            environment: &[(&str, &str)],
        ) -> Aiosmtpd {
            let outdir = tempfile::Builder::new()
                .prefix("tsubame-upstream-")
                .tempdir()
                .unwrap_or_else(|error| panic!("temporary directory: {error}"));
            let mut command = Command::new(python3());
            command
                .arg(peer_script("upstream.py"))
                .arg("--port")
                .arg(address.port().to_string())
                .arg("--bind")
                .arg(address.ip().to_string())
                .arg("--outdir")
                .arg(outdir.path())
                .args(options)
                .envs(environment.iter().copied());
            Self::spawn(command, address, outdir)
        }

        /// The delivery crate's aiosmtpd peer, `crates/delivery/tests/peers/aiosmtpd_sink.py`,
        /// on 127.0.0.1 and a free port with its options (`--starttls`, `--auth XOAUTH2`,
        /// `--issued-tokens LOG`, ...): it speaks XOAUTH2 and OAUTHBEARER as Gmail does.
        /// It stores messages as `upstream.py` does (so [`Aiosmtpd::received`] reads
        /// them) and logs each bearer login in `auth.log` and each MAIL in `mail.log`
        /// ([`Aiosmtpd::log_lines`]).
        #[track_caller]
        pub fn start_delivery_sink(options: &[&str]) -> Aiosmtpd {
            Self::start_delivery_sink_on(free_port(), options)
        }

        /// [`Aiosmtpd::start_delivery_sink`] on a given port of 127.0.0.1 (a restarted
        /// upstream).
        #[track_caller]
        pub fn start_delivery_sink_on(port: u16, options: &[&str]) -> Aiosmtpd {
            let address = SocketAddr::from(([127, 0, 0, 1], port));
            let outdir = tempfile::Builder::new()
                .prefix("tsubame-sink-")
                .tempdir()
                .unwrap_or_else(|error| panic!("temporary directory: {error}"));
            let mut command = Command::new(python3());
            command
                .arg(
                    crate::workspace_directory()
                        .join("crates/delivery/tests/peers/aiosmtpd_sink.py"),
                )
                .arg(address.port().to_string())
                .arg(outdir.path())
                .args(options);
            Self::spawn(command, address, outdir)
        }

        /// Runs `command` (an aiosmtpd peer) and waits for its `ready` file.
        #[track_caller]
        fn spawn(mut command: Command, address: SocketAddr, outdir: TempDir) -> Aiosmtpd {
            command
                .env("PYTHONUNBUFFERED", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            let mut child = ChildGuard::spawn(&mut command, "aiosmtpd upstream");
            let ready = outdir.path().join("ready");
            let started = wait_until(UPSTREAM_STARTUP_TIMEOUT, || {
                ready.exists() || child.try_wait().is_some()
            });
            assert!(
                started && ready.exists(),
                "the aiosmtpd upstream did not start on {address}; is aiosmtpd installed? \
                 (scripts/test does: pip install aiosmtpd)"
            );
            Aiosmtpd {
                _child: child,
                address,
                outdir,
            }
        }

        pub fn address(&self) -> SocketAddr {
            self.address
        }

        pub fn port(&self) -> u16 {
            self.address.port()
        }

        pub fn outdir(&self) -> &Path {
            self.outdir.path()
        }

        /// Every message stored so far, in arrival order.
        pub fn received(&self) -> Vec<Received> {
            let mut messages = Vec::new();
            for number in 1.. {
                let base = self.outdir.path().join(number.to_string());
                let envelope_path = base.with_extension("json");
                let Ok(envelope_text) = std::fs::read_to_string(&envelope_path) else {
                    break;
                };
                let envelope: Value = serde_json::from_str(&envelope_text)
                    .unwrap_or_else(|error| panic!("{}: {error}", envelope_path.display()));
                let content = std::fs::read(base.with_extension("eml"))
                    .unwrap_or_else(|error| panic!("{}.eml: {error}", base.display()));
                messages.push(Received { envelope, content });
            }
            messages
        }

        /// Waits until at least `count` messages are stored; fails the test otherwise.
        #[track_caller]
        pub fn wait_for(&self, count: usize, timeout: Duration) -> Vec<Received> {
            let arrived = wait_until(timeout, || self.received().len() >= count);
            let received = self.received();
            assert!(
                arrived,
                "the upstream received {} message(s) within {timeout:?}, expected {count}; \
                 events: {}; bearer logins: {}",
                received.len(),
                self.events().join("; "),
                self.log_lines("auth.log").join("; ")
            );
            received
        }

        /// Refusals so far (`reject ADDR`, `defer RCPTS`, `hang ADDR`).
        pub fn events(&self) -> Vec<String> {
            self.log_lines("events.log")
        }

        /// The lines of the peer's log file `name` in its output directory so far.
        pub fn log_lines(&self, name: &str) -> Vec<String> {
            std::fs::read_to_string(self.outdir.path().join(name))
                .map(|text| text.lines().map(str::to_string).collect())
                .unwrap_or_default()
        }
    }

    /// Postfix's `smtp-sink`, dumping each message into a directory, killed when dropped.
    #[derive(Debug)]
    pub struct SmtpSink {
        _child: ChildGuard,
        address: SocketAddr,
        dump: TempDir,
    }

    /// `smtp-sink`, or a failed test saying how to get it.
    pub fn smtp_sink_program() -> PathBuf {
        find_program("smtp-sink")
            .or_else(|| {
                let path = PathBuf::from("/usr/sbin/smtp-sink");
                path.is_file().then_some(path)
            })
            .unwrap_or_else(|| {
                panic!(
                    "smtp-sink is not installed: it comes with Postfix \
                     (scripts/test does: apt-get install postfix)"
                )
            })
    }

    impl SmtpSink {
        #[track_caller]
        pub fn start() -> SmtpSink {
            let address = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let dump = tempfile::Builder::new()
                .prefix("tsubame-smtp-sink-")
                .tempdir()
                .unwrap_or_else(|error| panic!("temporary directory: {error}"));
            let mut command = Command::new(smtp_sink_program());
            // -u: smtp-sink drops privileges to this user when run as root; the dump
            // directory must stay writable, so keep root (tests run as root in CI).
            let user = if rustix::process::getuid().is_root() {
                "root"
            } else {
                "nobody"
            };
            command
                .arg("-u")
                .arg(user)
                .arg("-d")
                .arg(format!("{}/%M.", dump.path().display()))
                .arg(address.to_string())
                .arg("100")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            let child = ChildGuard::spawn(&mut command, "smtp-sink");
            let listening = wait_until(UPSTREAM_STARTUP_TIMEOUT, || {
                std::net::TcpStream::connect(address).is_ok()
            });
            assert!(listening, "smtp-sink did not start listening on {address}");
            SmtpSink {
                _child: child,
                address,
                dump,
            }
        }

        pub fn address(&self) -> SocketAddr {
            self.address
        }

        /// The dump files so far: smtp-sink's own headers, then the message.
        pub fn dumps(&self) -> Vec<String> {
            let mut files: Vec<PathBuf> = std::fs::read_dir(self.dump.path())
                .map(|entries| {
                    entries
                        .filter_map(|entry| entry.ok().map(|e| e.path()))
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            files
                .iter()
                .filter_map(|path| std::fs::read(path).ok())
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .collect()
        }
    }
}

/// A local authoritative DNS server for MX and DKIM record tests: dnslib through
/// `crates/delivery/tests/peers/dns_zone.py` (the same peer the resolver's own tests use).
pub mod dns {
    use std::io::{BufRead, BufReader};
    use std::net::SocketAddr;
    use std::process::{Command, Stdio};
    use std::sync::mpsc;
    use std::time::Duration;

    use tempfile::TempDir;

    use crate::peers::python3;
    use crate::process::ChildGuard;

    /// How long the server may take to print its port.
    const DNS_STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
    /// It exits by itself after this long, should its guard never run.
    const DNS_LIFETIME_SECS: u32 = 600;

    #[derive(Debug)]
    pub struct DnsZone {
        _child: ChildGuard,
        address: SocketAddr,
        _directory: TempDir,
    }

    impl DnsZone {
        /// Serves `zone` (master-file lines) on 127.0.0.1, UDP and TCP.
        #[track_caller]
        pub fn start(zone: &str) -> DnsZone {
            Self::start_with_servfail(zone, &[])
        }

        /// As [`DnsZone::start`], answering SERVFAIL for the names in `servfail`.
        #[track_caller]
        pub fn start_with_servfail(zone: &str, servfail: &[&str]) -> DnsZone {
            let directory = tempfile::Builder::new()
                .prefix("tsubame-dns-")
                .tempdir()
                .unwrap_or_else(|error| panic!("temporary directory: {error}"));
            let zone_path = directory.path().join("zone.txt");
            std::fs::write(&zone_path, zone).unwrap_or_else(|error| panic!("zone file: {error}"));
            let script =
                crate::workspace_directory().join("crates/delivery/tests/peers/dns_zone.py");
            let mut command = Command::new(python3());
            command
                .arg(script)
                .arg(&zone_path)
                .arg("--lifetime")
                .arg(DNS_LIFETIME_SECS.to_string())
                .env("PYTHONUNBUFFERED", "1")
                // Kept open by the guard's child handle: the server exits when it closes.
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            for name in servfail {
                command.arg("--servfail").arg(name);
            }
            let mut child = ChildGuard::spawn(&mut command, "dnslib zone server");
            let stdout = child
                .take_stdout()
                .unwrap_or_else(|| panic!("dns_zone.py: no stdout"));
            let (sender, receiver) = mpsc::channel();
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = sender.send(line);
            });
            let line = receiver
                .recv_timeout(DNS_STARTUP_TIMEOUT)
                .unwrap_or_default();
            let port: u16 = line.trim().parse().unwrap_or_else(|_| {
                panic!(
                    "the dnslib zone server did not start (got {line:?}); is dnslib installed? \
                     (scripts/test does: pip install dnslib)"
                )
            });
            DnsZone {
                _child: child,
                address: SocketAddr::from(([127, 0, 0, 1], port)),
                _directory: directory,
            }
        }

        pub fn address(&self) -> SocketAddr {
            self.address
        }
    }
}

/// A throwaway PKI for TLS tests, made with the `openssl` command: a CA and a server
/// certificate for 127.0.0.1 and localhost, in a temporary directory.
pub mod pki {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use tempfile::TempDir;

    #[derive(Debug)]
    pub struct TestPki {
        directory: TempDir,
    }

    fn openssl(directory: &Path, arguments: &[&str]) {
        let output = Command::new("openssl")
            .current_dir(directory)
            .args(arguments)
            .output()
            .unwrap_or_else(|error| {
                panic!("openssl is missing ({error}): apt-get install openssl")
            });
        assert!(
            output.status.success(),
            "openssl {arguments:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    impl Default for TestPki {
        fn default() -> Self {
            Self::new()
        }
    }

    /// Key options of every certificate: P-256, no passphrase (fast to make).
    const EC_KEY: [&str; 5] = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];

    impl TestPki {
        /// A CA and the server certificate `server` (CN 127.0.0.1).
        #[track_caller]
        pub fn new() -> TestPki {
            let directory = tempfile::Builder::new()
                .prefix("tsubame-pki-")
                .tempdir()
                .unwrap_or_else(|error| panic!("temporary directory: {error}"));
            let path = directory.path();
            std::fs::write(
                path.join("server.ext"),
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
                 keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
            )
            .unwrap_or_else(|error| panic!("server.ext: {error}"));
            let mut ca = vec!["req", "-x509"];
            ca.extend(EC_KEY);
            ca.extend([
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=tsubame test CA",
            ]);
            openssl(path, &ca);
            let pki = TestPki { directory };
            pki.issue("server", "127.0.0.1");
            pki
        }

        /// Another certificate for 127.0.0.1 and localhost from the same CA, with
        /// common name `common_name`: `NAME.pem` and `NAME.key` in the PKI's directory.
        #[track_caller]
        pub fn issue(&self, name: &str, common_name: &str) -> (PathBuf, PathBuf) {
            let path = self.directory.path();
            let (key, csr, pem) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            let subject = format!("/CN={common_name}");
            let mut request = vec!["req"];
            request.extend(EC_KEY);
            request.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
            openssl(path, &request);
            openssl(
                path,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &pem,
                    "-days",
                    "2",
                    "-extfile",
                    "server.ext",
                ],
            );
            (path.join(pem), path.join(key))
        }

        /// The PKI's directory (the CA is `ca.pem` in it).
        pub fn directory(&self) -> &Path {
            self.directory.path()
        }

        pub fn ca(&self) -> PathBuf {
            self.directory.path().join("ca.pem")
        }

        pub fn certificate(&self) -> PathBuf {
            self.directory.path().join("server.pem")
        }

        pub fn key(&self) -> PathBuf {
            self.directory.path().join("server.key")
        }
    }
}

/// OAuth 2.0 for upstreams that log in with access tokens: the token endpoint peer
/// (`crates/oauth/tests/peers/token_endpoint.py`, Python's http.server and the
/// cryptography package, the same peer tsubame-oauth's own tests use) and throwaway
/// secrets and service-account keys.
pub mod oauth {
    use std::io::{BufRead, BufReader};
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;
    use std::time::Duration;

    use serde_json::Value;
    use tempfile::TempDir;

    use crate::peers::python3;
    use crate::process::ChildGuard;

    /// How long the peer may take to print its port (Python and cryptography start up).
    const TOKEN_ENDPOINT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
    /// It exits by itself after this long, should its guard never run.
    const TOKEN_ENDPOINT_LIFETIME_SECS: u32 = 600;

    /// A secret made up for one test run (never a real one): `prefix`, then the process
    /// id and a clock reading, different each run and each call.
    pub fn throwaway_secret(prefix: &str) -> String {
        use std::hash::{BuildHasher, RandomState};
        let value = RandomState::new().hash_one(std::time::SystemTime::now());
        format!("{prefix}-{}-{value:016x}", std::process::id())
    }

    /// What the token endpoint checks and answers.
    #[derive(Debug, Default, Clone)]
    pub struct TokenEndpointOptions {
        pub client_id: String,
        pub client_secret: String,
        /// The refresh tokens it honours (one per account).
        pub refresh_tokens: Vec<String>,
        /// A service account's public key file, key id and address, to check
        /// jwt-bearer assertions with.
        pub service_account: Option<(PathBuf, String, String)>,
    }

    /// A running token endpoint on 127.0.0.1, killed when dropped. It issues the access
    /// tokens `at-1`, `at-2`, ... in order and logs every request.
    #[derive(Debug)]
    pub struct TokenEndpoint {
        _child: ChildGuard,
        port: u16,
        /// Holds the request log and the mode file.
        directory: TempDir,
    }

    impl TokenEndpoint {
        #[track_caller]
        pub fn start(options: &TokenEndpointOptions) -> TokenEndpoint {
            let directory = tempfile::Builder::new()
                .prefix("tsubame-token-endpoint-")
                .tempdir()
                .unwrap_or_else(|error| panic!("temporary directory: {error}"));
            let mut command = Command::new(python3());
            command
                .arg(
                    crate::workspace_directory().join("crates/oauth/tests/peers/token_endpoint.py"),
                )
                .arg("--log")
                .arg(directory.path().join("requests.jsonl"))
                .arg("--mode-file")
                .arg(directory.path().join("mode"))
                .arg("--client-id")
                .arg(&options.client_id)
                .arg("--client-secret")
                .arg(&options.client_secret)
                .arg("--lifetime")
                .arg(TOKEN_ENDPOINT_LIFETIME_SECS.to_string())
                .env("PYTHONUNBUFFERED", "1")
                // Kept open by the guard's child handle: the peer exits when it closes.
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            for refresh_token in &options.refresh_tokens {
                command.arg("--refresh-token").arg(refresh_token);
            }
            if let Some((public_key, key_id, address)) = &options.service_account {
                command
                    .arg("--public-key")
                    .arg(public_key)
                    .arg("--key-id")
                    .arg(key_id)
                    .arg("--service-account")
                    .arg(address);
            }
            let mut child = ChildGuard::spawn(&mut command, "token endpoint peer");
            let stdout = child
                .take_stdout()
                .unwrap_or_else(|| panic!("token_endpoint.py: no stdout"));
            let (sender, receiver) = mpsc::channel();
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = sender.send(line);
            });
            let line = receiver
                .recv_timeout(TOKEN_ENDPOINT_STARTUP_TIMEOUT)
                .unwrap_or_default();
            let port: u16 = line.trim().parse().unwrap_or_else(|_| {
                panic!(
                    "the token endpoint peer did not start (printed {line:?}); is the Python \
                     package cryptography installed? (scripts/test does: pip install cryptography)"
                )
            });
            TokenEndpoint {
                _child: child,
                port,
                directory,
            }
        }

        /// `token_endpoint` for an `[[oauth]]` source.
        pub fn url(&self) -> String {
            format!("http://127.0.0.1:{}/token", self.port)
        }

        /// The request log (JSON lines), which the SMTP peer reads with
        /// `--issued-tokens` to know which tokens were issued for whom.
        pub fn log_path(&self) -> PathBuf {
            self.directory.path().join("requests.jsonl")
        }

        /// `ok`, `invalid_grant`, `unauthorized_client`, `500` or `hang`: how the next
        /// requests are answered.
        #[track_caller]
        pub fn set_mode(&self, mode: &str) {
            let path = self.directory.path().join("mode");
            std::fs::write(&path, mode)
                .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        }

        /// The POSTs to /token so far, oldest first: `grant_type`, `ok`, `why`, `sub`,
        /// `mode`, `refresh_token` (the one a refresh grant presented), `access_token`
        /// (the one issued).
        #[track_caller]
        pub fn token_requests(&self) -> Vec<Value> {
            let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            text.lines()
                .map(|line| {
                    serde_json::from_str(line)
                        .unwrap_or_else(|error| panic!("token endpoint log {line:?}: {error}"))
                })
                .filter(|request: &Value| request["path"] == "/token")
                .collect()
        }
    }

    /// A throwaway 2048-bit RSA key made with `openssl genpkey`, and its public half,
    /// as a Google service account's.
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
            .unwrap_or_else(|error| {
                panic!("openssl is missing ({error}): apt-get install openssl")
            });
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
                .prefix("tsubame-service-account-")
                .tempdir()
                .unwrap_or_else(|error| panic!("temporary directory: {error}"));
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

        /// What a token endpoint peer needs to check this key's assertions: the public
        /// key file, the key id and the service account's address.
        pub fn peer_option(&self, client_email: &str) -> Option<(PathBuf, String, String)> {
            Some((
                self.public_key_path(),
                self.key_id.clone(),
                client_email.to_string(),
            ))
        }

        /// The JSON key file Google would issue for this key.
        #[track_caller]
        pub fn key_file_json(&self, client_email: &str, token_uri: &str) -> String {
            let private_key = std::fs::read_to_string(self.directory.path().join("key.pem"))
                .unwrap_or_else(|error| panic!("key.pem: {error}"));
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

        /// Writes the JSON key file Google would issue for this key (mode 0600) and
        /// returns its path.
        #[track_caller]
        pub fn write_key_file(&self, client_email: &str, token_uri: &str) -> PathBuf {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let json = self.key_file_json(client_email, token_uri);
            let path = self.directory.path().join("service-account.json");
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut file| file.write_all(json.as_bytes()))
                .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
            path
        }
    }
}

/// DKIM verification by two verifiers nobody here wrote: mail-auth's own (fed the
/// published TXT records through its resolver cache) and dkimpy (fed them through
/// `dnsfunc`, in `peers/dkimpy_verify.py`). Records are (DNS name, TXT value) pairs,
/// e.g. ("sel._domainkey.example.com.", "v=DKIM1; k=rsa; p=...").
pub mod dkim {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::borrow::Borrow;
    use std::collections::HashMap;
    use std::hash::Hash;
    use std::process::Command;
    use std::sync::Mutex;

    use mail_auth::common::parse::TxtRecordParser as _;
    use mail_auth::common::verify::DomainKey;
    use mail_auth::{
        AuthenticatedMessage, DkimResult, MessageAuthenticator, Parameters, ResolverCache, Txt,
    };

    struct TxtCache(Mutex<HashMap<Box<str>, Txt>>);

    impl ResolverCache<Box<str>, Txt> for TxtCache {
        fn get<Q>(&self, name: &Q) -> Option<Txt>
        where
            Box<str>: Borrow<Q>,
            Q: Hash + Eq + ?Sized,
        {
            self.0.lock().unwrap().get(name).cloned()
        }

        fn remove<Q>(&self, name: &Q) -> Option<Txt>
        where
            Box<str>: Borrow<Q>,
            Q: Hash + Eq + ?Sized,
        {
            self.0.lock().unwrap().remove(name)
        }

        fn insert(&self, key: Box<str>, value: Txt, _: std::time::Instant) {
            self.0.lock().unwrap().insert(key, value);
        }
    }

    /// mail-auth's verdict on every signature: true when all pass (and there is one).
    pub fn mail_auth_verifies(message: &[u8], records: &[(String, String)]) -> bool {
        let cache = TxtCache(Mutex::new(HashMap::new()));
        for (name, value) in records {
            let key = DomainKey::parse(value.as_bytes()).unwrap();
            cache.insert(
                name.as_str().into(),
                Txt::from(key),
                std::time::Instant::now(),
            );
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            // The resolver is never asked: every record is in the cache.
            let authenticator = MessageAuthenticator::new_cloudflare().unwrap();
            let parsed = AuthenticatedMessage::parse(message).unwrap();
            let outputs = authenticator
                .verify_dkim(Parameters::new(&parsed).with_txt_cache(&cache))
                .await;
            !outputs.is_empty()
                && outputs
                    .iter()
                    .all(|output| *output.result() == DkimResult::Pass)
        })
    }

    /// dkimpy's verdict, through tests/dkimpy_verify.py.
    pub fn dkimpy_verifies(message: &[u8], records: &[(String, String)]) -> bool {
        let directory = tempfile::tempdir().unwrap();
        let message_path = directory.path().join("message.eml");
        std::fs::write(&message_path, message).unwrap();
        let script = crate::tests_directory().join("peers/dkimpy_verify.py");
        let output = Command::new("python3")
            .arg(&script)
            .arg(&message_path)
            .args(
                records
                    .iter()
                    .map(|(name, value)| format!("{name}={value}")),
            )
            .output()
            .expect("python3 (scripts/test installs it)");
        match output.status.code() {
            Some(0) => true,
            Some(1) => false,
            _ => panic!(
                "dkimpy_verify.py could not run (scripts/test installs dkimpy and pynacl): {}",
                String::from_utf8_lossy(&output.stderr)
            ),
        }
    }
}
