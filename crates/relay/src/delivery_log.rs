//! The delivery log: one JSON line per delivery event (a message queued for a
//! recipient, delivered, deferred, bounced, expired), for operators and `tsubame log`.
//!
//! The writer belongs to the dispatcher thread, where every event happens, so it needs
//! no lock. Lines go through a buffer flushed at least every [`FLUSH_INTERVAL`] and at
//! shutdown: a crash can lose the last second of the log, never the mail (the spool's
//! journal is the record that counts). The current file is rotated, renamed
//! `NAME.YYYYMMDD-HHMMSS` (UTC, the time of rotation), before a line would take it past
//! `max_size_bytes` and at the first event of a new UTC day; rotated files older than
//! `retention_days` are deleted. A write error is logged once and never stops
//! delivery: the events it loses are lost.
//!
//! No message content, no credentials: addresses, the upstream's reply text and our own
//! explanations only.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tsubame_config::DeliveryLogConfig;

/// Longest a written line waits in the buffer before it reaches the file.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Bytes buffered before a write reaches the file regardless of the interval.
const BUFFER_BYTES: usize = 64 * 1024;

const MILLISECONDS_PER_DAY: u64 = 86_400_000;

/// File mode of the log: it names senders and recipients.
const FILE_MODE: u32 = 0o600;

/// Most rotated files with the same second's name (a tiny size limit under a burst):
/// beyond it the current file just grows until the next second.
const SAME_SECOND_ROTATIONS_MAX: u32 = 1000;

/// What happened, as the log's `event` field says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// The dispatcher queued the message for this recipient.
    Received,
    Delivered,
    Deferred,
    /// Failed permanently; a bounce went to the sender (unless the sender is `<>`).
    Bounced,
    /// Queued longer than the maximum queue time; bounced.
    Expired,
}

impl EventKind {
    pub const ALL: [EventKind; 5] = [
        Self::Received,
        Self::Delivered,
        Self::Deferred,
        Self::Bounced,
        Self::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Received => "received",
            Self::Delivered => "delivered",
            Self::Deferred => "deferred",
            Self::Bounced => "bounced",
            Self::Expired => "expired",
        }
    }
}

/// One line of the log. Field order is the line's order and the CSV export's columns.
/// The text borrows (from the message and the attempt when written, from the line when
/// read and it needs no unescaping), so an event costs no copy of its addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record<'a> {
    /// RFC 3339, UTC, milliseconds: `2026-11-26T06:30:37.123Z`.
    #[serde(borrow)]
    pub time: Cow<'a, str>,
    pub event: EventKind,
    /// The spool's message id, 16 hex digits.
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    /// The client's Message-ID header field, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub message_id: Option<Cow<'a, str>>,
    /// The envelope sender; empty for `<>`.
    #[serde(borrow)]
    pub sender: Cow<'a, str>,
    #[serde(borrow)]
    pub recipient: Cow<'a, str>,
    /// The upstream (route) the recipient goes through.
    #[serde(borrow)]
    pub upstream: Cow<'a, str>,
    /// The host that answered, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub remote: Option<Cow<'a, str>>,
    /// The upstream's reply (`550 5.1.1 no such user`) or our own explanation; absent
    /// for `received`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub reply: Option<Cow<'a, str>>,
    /// What kind of failure, in plain words (`recipient unknown`); deferred, bounced
    /// and expired events only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub category: Option<Cow<'a, str>>,
    /// 1 for the first attempt; 0 for `received`.
    pub attempt: u32,
    pub size_bytes: u64,
    /// TLS version and cipher suite of the upstream connection, when encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub tls: Option<Cow<'a, str>>,
    /// Milliseconds since the message was received.
    pub since_received_ms: u64,
    /// How long the attempt (the worker's job) took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_ms: Option<u64>,
}

/// The log's writer, owned by the dispatcher.
#[derive(Debug)]
pub(crate) struct DeliveryLog {
    path: PathBuf,
    max_size_bytes: u64,
    retention: Duration,
    /// `None` until the first event, and after a failure (opened again at the next).
    file: Option<BufWriter<File>>,
    /// Bytes in the current file, buffered ones included.
    size_bytes: u64,
    /// UTC day (days since 1970) the current file's first line was written on.
    day: u64,
    /// Whether the buffer holds lines not yet flushed.
    dirty: bool,
    last_flush: Instant,
    /// Set after a failure was logged, cleared by the next success: one warning per
    /// run of failures.
    warned: bool,
}

impl DeliveryLog {
    /// The writer `config` asks for, or `None` when the log is off. Opens nothing yet.
    pub fn new(config: &DeliveryLogConfig, spool_directory: &Path) -> Option<DeliveryLog> {
        config.enabled.then(|| DeliveryLog {
            path: config.path_in(spool_directory),
            max_size_bytes: config.max_size_bytes,
            retention: Duration::from_secs(u64::from(config.retention_days) * 86_400),
            file: None,
            size_bytes: 0,
            day: 0,
            dirty: false,
            last_flush: Instant::now(),
            warned: false,
        })
    }

    /// Appends one event at `now_unix_ms`, rotating first if it is due.
    pub fn write(&mut self, record: &Record<'_>, now_unix_ms: u64) {
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(error) => return self.failed("cannot encode an event", &error),
        };
        line.push(b'\n');
        if let Err(error) = self.write_line(&line, now_unix_ms) {
            self.file = None;
            self.failed("cannot write", &error);
        } else {
            self.warned = false;
        }
    }

    fn write_line(&mut self, line: &[u8], now_unix_ms: u64) -> std::io::Result<()> {
        let today = now_unix_ms / MILLISECONDS_PER_DAY;
        if self.file.is_none() {
            self.open(now_unix_ms)?;
        }
        let too_big =
            self.size_bytes > 0 && self.size_bytes + line.len() as u64 > self.max_size_bytes;
        if too_big || (self.size_bytes > 0 && today != self.day) {
            self.rotate(now_unix_ms)?;
        }
        let Some(file) = self.file.as_mut() else {
            return Err(std::io::Error::other("the log file is not open"));
        };
        file.write_all(line)?;
        if self.size_bytes == 0 {
            self.day = today;
        }
        self.size_bytes += line.len() as u64;
        self.dirty = true;
        Ok(())
    }

    /// Opens (creating, mode 0600) the current file for appending. An existing file
    /// keeps the day of its last write, so one left from yesterday is rotated first.
    fn open(&mut self, now_unix_ms: u64) -> std::io::Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(FILE_MODE)
            .open(&self.path)?;
        let metadata = file.metadata()?;
        self.size_bytes = metadata.len();
        self.day = metadata
            .modified()
            .ok()
            .and_then(|modified| modified.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(now_unix_ms, |since| since.as_millis() as u64)
            / MILLISECONDS_PER_DAY;
        self.file = Some(BufWriter::with_capacity(BUFFER_BYTES, file));
        self.prune();
        Ok(())
    }

    /// Renames the current file to its rotated name and starts a new one.
    fn rotate(&mut self, now_unix_ms: u64) -> std::io::Result<()> {
        if let Some(mut file) = self.file.take() {
            file.flush()?;
        }
        self.dirty = false;
        let stamp = rotation_stamp(now_unix_ms);
        let mut target = self.rotated_path(&stamp, 0);
        let mut suffix = 0;
        while target.exists() {
            suffix += 1;
            if suffix > SAME_SECOND_ROTATIONS_MAX {
                // Keep writing to the current file; rotation is tried at the next line.
                return self.open(now_unix_ms);
            }
            target = self.rotated_path(&stamp, suffix);
        }
        std::fs::rename(&self.path, &target)?;
        self.open(now_unix_ms)
    }

    fn rotated_path(&self, stamp: &str, suffix: u32) -> PathBuf {
        let mut name = self.path.as_os_str().to_os_string();
        name.push(".");
        name.push(stamp);
        if suffix > 0 {
            name.push(format!(".{suffix}"));
        }
        PathBuf::from(name)
    }

    /// Deletes rotated files last written more than `retention` ago.
    fn prune(&self) {
        let now = SystemTime::now();
        for rotated in rotated_files(&self.path) {
            let old = std::fs::metadata(&rotated)
                .and_then(|metadata| metadata.modified())
                .ok()
                .and_then(|modified| now.duration_since(modified).ok())
                .is_some_and(|age| age > self.retention);
            if old && let Err(error) = std::fs::remove_file(&rotated) {
                tracing::warn!(path = %rotated.display(), %error, "cannot delete an old delivery log");
            }
        }
    }

    /// Flushes the buffer if a line has waited [`FLUSH_INTERVAL`]; the dispatcher
    /// calls this on every turn of its loop.
    pub fn tick(&mut self) {
        if self.dirty && self.last_flush.elapsed() >= FLUSH_INTERVAL {
            self.flush();
        }
    }

    /// How long until [`DeliveryLog::tick`] has a flush to do, if it will.
    pub fn next_flush_in(&self) -> Option<Duration> {
        self.dirty
            .then(|| FLUSH_INTERVAL.saturating_sub(self.last_flush.elapsed()))
    }

    pub fn flush(&mut self) {
        self.last_flush = Instant::now();
        self.dirty = false;
        if let Some(file) = self.file.as_mut()
            && let Err(error) = file.flush()
        {
            self.file = None;
            self.failed("cannot write", &error);
        }
    }

    fn failed(&mut self, what: &str, error: &dyn std::fmt::Display) {
        if !self.warned {
            self.warned = true;
            tracing::warn!(path = %self.path.display(), %error, "delivery log: {what}; events are lost until it works again (delivery goes on)");
        }
    }
}

impl Drop for DeliveryLog {
    fn drop(&mut self) {
        self.flush();
    }
}

/// `YYYYMMDD-HHMMSS` in UTC.
fn rotation_stamp(unix_ms: u64) -> String {
    let text = tsubame_delivery::dsn::rfc3339_ms(unix_ms);
    // 2026-11-26T06:30:37.123Z -> 20261126-063037
    let digits: String = text.chars().take(19).filter(char::is_ascii_digit).collect();
    match digits.split_at_checked(8) {
        Some((date, time)) => format!("{date}-{time}"),
        None => digits,
    }
}

/// The rotated files of the log at `path`, oldest first (by the stamp in their name,
/// then their same-second suffix).
pub fn rotated_files(path: &Path) -> Vec<PathBuf> {
    let (Some(directory), Some(name)) = (
        path.parent(),
        path.file_name().and_then(|name| name.to_str()),
    ) else {
        return Vec::new();
    };
    let directory = if directory.as_os_str().is_empty() {
        Path::new(".")
    } else {
        directory
    };
    let Ok(entries) = std::fs::read_dir(directory) else {
        return Vec::new();
    };
    let prefix = format!("{name}.");
    let mut found: Vec<((String, u32), PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let file_name = entry.file_name().into_string().ok()?;
            let rest = file_name.strip_prefix(&prefix)?;
            let (stamp, suffix) = match rest.split_once('.') {
                Some((stamp, suffix)) => (stamp, suffix.parse().ok()?),
                None => (rest, 0),
            };
            let valid = stamp.len() == 15
                && stamp.bytes().enumerate().all(|(position, byte)| {
                    if position == 8 {
                        byte == b'-'
                    } else {
                        byte.is_ascii_digit()
                    }
                });
            valid.then(|| ((stamp.to_string(), suffix), directory.join(&file_name)))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, path)| path).collect()
}

/// Every file of the log at `path` in time order: the rotated ones, then the current.
pub fn files_in_order(path: &Path) -> Vec<PathBuf> {
    let mut files = rotated_files(path);
    if path.exists() {
        files.push(path.to_path_buf());
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(recipient: &str) -> Record<'_> {
        Record {
            time: "2026-11-26T06:30:37.123Z".into(),
            event: EventKind::Deferred,
            id: "0123456789abcdef".into(),
            message_id: None,
            sender: "a@example.com".into(),
            recipient: recipient.into(),
            upstream: "relay".into(),
            remote: Some("smtp.example.net".into()),
            reply: Some("451 4.3.0 try later".into()),
            category: Some("other".into()),
            attempt: 1,
            size_bytes: 1234,
            tls: None,
            since_received_ms: 5,
            attempt_ms: Some(3),
        }
    }

    fn config(directory: &Path, max_size_bytes: u64) -> DeliveryLogConfig {
        DeliveryLogConfig {
            enabled: true,
            path: Some(directory.join("delivery.log")),
            max_size_bytes,
            retention_days: 30,
        }
    }

    /// The recipient of every line in the log's files, oldest first; each line must
    /// parse as a record.
    fn read_all(path: &Path) -> Vec<String> {
        files_in_order(path)
            .iter()
            .flat_map(|file| {
                std::fs::read_to_string(file)
                    .expect("read")
                    .lines()
                    .map(|line| {
                        let record: Record<'_> = serde_json::from_str(line).expect("a JSON line");
                        record.recipient.into_owned()
                    })
                    .collect::<Vec<String>>()
            })
            .collect()
    }

    #[test]
    fn a_line_with_escapes_reads_back_equal() {
        let mut written = record("J\u{f6}rg@example.com");
        written.reply = Some("550 \"no\" \\ such\tuser \u{1F985}".into());
        let line = serde_json::to_string(&written).expect("json");
        let read: Record<'_> = serde_json::from_str(&line).expect("a JSON line");
        assert_eq!(read, written);
    }

    #[test]
    fn rotates_by_size_and_keeps_every_line_in_order() {
        let directory = tempfile::tempdir().expect("tempdir");
        let line_bytes = serde_json::to_vec(&record("r00@example.com"))
            .expect("json")
            .len()
            + 1;
        // Room for three lines per file.
        let mut log = DeliveryLog::new(
            &config(directory.path(), 3 * line_bytes as u64 + 1),
            directory.path(),
        )
        .expect("enabled");
        let now_ms = 1_764_138_637_123;
        for index in 0..10 {
            log.write(&record(&format!("r{index:02}@example.com")), now_ms);
        }
        log.flush();
        let path = directory.path().join("delivery.log");
        let rotated = rotated_files(&path);
        assert_eq!(rotated.len(), 3, "{rotated:?}");
        let names: Vec<String> = rotated
            .iter()
            .map(|path| {
                path.file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "delivery.log.20251126-063037",
                "delivery.log.20251126-063037.1",
                "delivery.log.20251126-063037.2"
            ]
        );
        for file in &rotated {
            assert!(std::fs::metadata(file).expect("metadata").len() <= 3 * line_bytes as u64);
        }
        let recipients: Vec<String> = read_all(&path);
        let expected: Vec<String> = (0..10)
            .map(|index| format!("r{index:02}@example.com"))
            .collect();
        assert_eq!(recipients, expected);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn rotates_at_the_day_change() {
        let directory = tempfile::tempdir().expect("tempdir");
        let mut log = DeliveryLog::new(&config(directory.path(), 1 << 20), directory.path())
            .expect("enabled");
        let day_ms = MILLISECONDS_PER_DAY;
        let now_ms = std::time::SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64;
        log.write(&record("a@example.com"), now_ms);
        log.write(&record("b@example.com"), now_ms + day_ms);
        log.flush();
        let path = directory.path().join("delivery.log");
        assert_eq!(rotated_files(&path).len(), 1);
        assert_eq!(read_all(&path).len(), 2);
    }

    #[test]
    fn a_write_error_does_not_panic_and_is_retried() {
        let directory = tempfile::tempdir().expect("tempdir");
        let mut settings = config(directory.path(), 1 << 20);
        settings.path = Some(directory.path().join("missing").join("delivery.log"));
        let mut log = DeliveryLog::new(&settings, directory.path()).expect("enabled");
        log.write(&record("a@example.com"), 0);
        assert!(log.warned);
        std::fs::create_dir(directory.path().join("missing")).expect("mkdir");
        log.write(&record("b@example.com"), 0);
        log.flush();
        assert!(!log.warned);
        assert_eq!(
            read_all(&directory.path().join("missing").join("delivery.log")).len(),
            1
        );
    }

    #[test]
    fn off_means_no_writer() {
        let mut settings = config(Path::new("/nonexistent"), 1 << 20);
        settings.enabled = false;
        assert!(DeliveryLog::new(&settings, Path::new("/nonexistent")).is_none());
    }

    #[test]
    fn the_default_path_is_in_the_spool_directory() {
        let log = DeliveryLog::new(&DeliveryLogConfig::default(), Path::new("/var/spool/t"))
            .expect("on by default");
        assert_eq!(log.path, Path::new("/var/spool/t/delivery.log"));
    }
}
