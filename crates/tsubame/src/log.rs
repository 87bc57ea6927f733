//! `tsubame log`: search the delivery log (`<spool>/delivery.log` and its rotated
//! files, oldest first) or export it as CSV. Works offline, on the files alone.

use std::borrow::Cow;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use tsubame_delivery::FailureCategory;
use tsubame_delivery::dsn::parse_rfc3339_ms;
use tsubame_relay::delivery_log::{EventKind, Record, files_in_order};

const MILLISECONDS_PER_DAY: u64 = 86_400_000;

/// Shown under `log`, `log search` and `log export --help`.
const EXAMPLES: &str = "Examples:\n  \
    tsubame log search --recipient bob@example.com\n  \
    tsubame log search --config /etc/tsubame.toml --status bounced --since 2026-11-01\n  \
    tsubame log search --category \"recipient unknown\" --json\n  \
    tsubame log export --csv --since 2026-11-01 --until 2026-11-30 > november.csv\n  \
    tsubame log export --csv --file /var/log/tsubame/delivery.log --sender printer@example.com";

#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct LogArgs {
    #[command(subcommand)]
    command: LogCommand,
}

#[derive(Debug, clap::Subcommand)]
enum LogCommand {
    /// Print the events that match every filter given, oldest first: one readable line
    /// each, or with --json the log's own JSON lines.
    #[command(after_help = EXAMPLES)]
    Search {
        #[command(flatten)]
        source: Source,
        #[command(flatten)]
        filters: Filters,
        /// Print each event as its JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Write the events that match every filter given as CSV (RFC 4180: a header row,
    /// CRLF line ends, UTF-8), oldest first, to standard output.
    #[command(after_help = EXAMPLES)]
    Export {
        #[command(flatten)]
        source: Source,
        #[command(flatten)]
        filters: Filters,
        /// CSV output (the only format; required so that another can be added).
        #[arg(long, required = true)]
        csv: bool,
    },
}

/// Where the log is: --file, else the one the configuration names, else
/// `delivery.log` in the spool directory.
#[derive(Debug, clap::Args)]
struct Source {
    /// The server's configuration file: its [delivery_log] path, or its spool
    /// directory's delivery.log.
    #[arg(short, long, value_name = "FILE", conflicts_with_all = ["spool", "file"])]
    config: Option<PathBuf>,
    /// The spool directory whose delivery.log to read. Without --config, --spool and
    /// --file: the embedded default's ./spool.
    #[arg(long, value_name = "DIR", conflicts_with = "file")]
    spool: Option<PathBuf>,
    /// The current log file itself; its rotated files (PATH.YYYYMMDD-HHMMSS) are read
    /// first.
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct Filters {
    /// Only events of this envelope sender (case-insensitive; "<>" for bounces).
    #[arg(long, value_name = "ADDRESS")]
    sender: Option<String>,
    /// Only events of this recipient (case-insensitive).
    #[arg(long, value_name = "ADDRESS")]
    recipient: Option<String>,
    /// Only this event: received, delivered, deferred, bounced or expired.
    #[arg(long, value_name = "EVENT", value_parser = parse_event)]
    status: Option<EventKind>,
    /// Only failures of this kind: authentication, quota, "recipient unknown",
    /// "mailbox full", policy/spam, dns, tls, timeout, connection or other.
    #[arg(long, value_name = "CATEGORY", value_parser = parse_category)]
    category: Option<FailureCategory>,
    /// Only events at or after T: RFC 3339 (2026-11-26T09:30:00Z, 2026-11-26T18:30:00+09:00)
    /// or a date (2026-11-26, midnight UTC).
    #[arg(long, value_name = "T", value_parser = parse_since)]
    since: Option<u64>,
    /// Only events at or before T: RFC 3339, or a date (the whole day, UTC, included).
    #[arg(long, value_name = "T", value_parser = parse_until)]
    until: Option<u64>,
}

pub(crate) fn parse_event(text: &str) -> Result<EventKind, String> {
    EventKind::ALL
        .into_iter()
        .find(|event| event.as_str().eq_ignore_ascii_case(text))
        .ok_or_else(|| {
            let names: Vec<&str> = EventKind::ALL.iter().map(|event| event.as_str()).collect();
            format!("expected one of {}", names.join(", "))
        })
}

pub(crate) fn parse_category(text: &str) -> Result<FailureCategory, String> {
    FailureCategory::ALL
        .into_iter()
        .find(|category| category.as_str().eq_ignore_ascii_case(text.trim()))
        .ok_or_else(|| {
            let names: Vec<&str> = FailureCategory::ALL
                .iter()
                .map(|category| category.as_str())
                .collect();
            format!("expected one of {}", names.join(", "))
        })
}

pub(crate) fn parse_since(text: &str) -> Result<u64, String> {
    parse_rfc3339_ms(text).ok_or_else(|| {
        "expected an RFC 3339 time (2026-11-26T09:30:00Z) or a date (2026-11-26)".to_string()
    })
}

pub(crate) fn parse_until(text: &str) -> Result<u64, String> {
    let start = parse_since(text)?;
    // A bare date means the whole day.
    Ok(if text.len() == 10 {
        start + MILLISECONDS_PER_DAY - 1
    } else {
        start
    })
}

impl Filters {
    fn query(&self) -> LogQuery {
        LogQuery {
            sender: self.sender.clone(),
            recipient: self.recipient.clone(),
            status: self.status,
            category: self.category,
            since: self.since,
            until: self.until,
            ..LogQuery::default()
        }
    }
}

/// Which events a search or export wants; every condition given must hold. Shared by
/// `tsubame log` and the admin server's `/api/log`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LogQuery {
    /// The envelope sender, exactly (case-insensitive; "<>" for the null sender).
    pub sender: Option<String>,
    /// The recipient, exactly (case-insensitive).
    pub recipient: Option<String>,
    /// Part of the sender or the recipient (case-insensitive): the web page's search.
    pub address: Option<String>,
    /// The spool message id (16 hex digits).
    pub id: Option<String>,
    pub status: Option<EventKind>,
    pub category: Option<FailureCategory>,
    /// Unix milliseconds, inclusive.
    pub since: Option<u64>,
    pub until: Option<u64>,
}

impl LogQuery {
    pub fn accepts(&self, record: &Record<'_>) -> bool {
        let same = |wanted: &Option<String>, actual: &str| {
            wanted.as_deref().is_none_or(|wanted| {
                let wanted = wanted.trim();
                let wanted = if wanted == "<>" { "" } else { wanted };
                wanted.eq_ignore_ascii_case(actual)
            })
        };
        if !same(&self.sender, &record.sender) || !same(&self.recipient, &record.recipient) {
            return false;
        }
        if let Some(part) = &self.address {
            let part = part.trim().to_ascii_lowercase();
            if !record.sender.to_ascii_lowercase().contains(&part)
                && !record.recipient.to_ascii_lowercase().contains(&part)
            {
                return false;
            }
        }
        if self
            .id
            .as_deref()
            .is_some_and(|id| !id.trim().eq_ignore_ascii_case(&record.id))
        {
            return false;
        }
        if self.status.is_some_and(|status| status != record.event) {
            return false;
        }
        if let Some(category) = self.category
            && record.category.as_deref() != Some(category.as_str())
        {
            return false;
        }
        if self.since.is_some() || self.until.is_some() {
            let Some(time) = parse_rfc3339_ms(&record.time) else {
                return false;
            };
            if self.since.is_some_and(|since| time < since)
                || self.until.is_some_and(|until| time > until)
            {
                return false;
            }
        }
        true
    }
}

impl Source {
    fn log_path(&self) -> anyhow::Result<PathBuf> {
        if let Some(file) = &self.file {
            return Ok(file.clone());
        }
        if let Some(spool) = &self.spool {
            return Ok(tsubame_config::DeliveryLogConfig::default().path_in(spool));
        }
        let config = match &self.config {
            Some(path) => tsubame_config::Config::load(path)?,
            None => tsubame_config::Config::embedded_default()?,
        };
        Ok(config.delivery_log.path_in(&config.spool.directory))
    }
}

pub fn run(args: LogArgs) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match args.command {
        LogCommand::Search {
            source,
            filters,
            json,
        } => {
            let path = source.log_path()?;
            each_record(&path, &filters.query(), |record, line| {
                if json {
                    out.write_all(line.as_bytes())?;
                    out.write_all(b"\n")
                } else {
                    writeln!(out, "{}", plain_line(record))
                }
            })?;
        }
        LogCommand::Export {
            source, filters, ..
        } => {
            let path = source.log_path()?;
            write_csv_row(&mut out, &CSV_HEADER)?;
            each_record(&path, &filters.query(), |record, _| {
                write_csv_row(&mut out, &csv_fields(record))
            })?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Calls `emit` with each record of the log at `path` that `query` accepts, and its
/// line, oldest file first. Lines that are not events (a torn last line after a crash)
/// are skipped and counted on standard error.
fn each_record(
    path: &Path,
    query: &LogQuery,
    emit: impl FnMut(&Record<'_>, &str) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let files = files_in_order(path);
    if files.is_empty() {
        anyhow::bail!("no delivery log at {}", path.display());
    }
    let skipped = scan_files(&files, query, emit)?;
    if skipped > 0 {
        eprintln!("tsubame: skipped {skipped} lines that are not delivery events");
    }
    Ok(())
}

/// Calls `emit` with each record of `files` (oldest first) that `query` accepts, and
/// its line; returns how many lines were not events. A file that vanished since it was
/// listed (rotated away by retention) is skipped.
pub(crate) fn scan_files(
    files: &[PathBuf],
    query: &LogQuery,
    emit: impl FnMut(&Record<'_>, &str) -> std::io::Result<()>,
) -> anyhow::Result<u64> {
    let mut opened = open_files(files)?;
    scan_open(&mut opened, query, emit)
}

/// Opens `files` (oldest first), skipping those that vanished since they were listed.
/// Scans of the open files see the same files however the log rotates meanwhile.
pub(crate) fn open_files(files: &[PathBuf]) -> anyhow::Result<Vec<(PathBuf, std::fs::File)>> {
    let mut opened = Vec::with_capacity(files.len());
    for file in files {
        match std::fs::File::open(file) {
            Ok(handle) => opened.push((file.clone(), handle)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error).with_context(|| format!("{}", file.display())),
        }
    }
    Ok(opened)
}

/// [`scan_files`] over files opened by [`open_files`], each read from its start.
pub(crate) fn scan_open(
    files: &mut [(PathBuf, std::fs::File)],
    query: &LogQuery,
    mut emit: impl FnMut(&Record<'_>, &str) -> std::io::Result<()>,
) -> anyhow::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut skipped = 0u64;
    for (path, file) in files.iter_mut() {
        file.seek(SeekFrom::Start(0))
            .with_context(|| format!("{}", path.display()))?;
        for line in BufReader::new(&*file).lines() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let Ok(record) = serde_json::from_str::<Record>(&line) else {
                skipped += 1;
                continue;
            };
            if query.accepts(&record) {
                emit(&record, &line)?;
            }
        }
    }
    Ok(skipped)
}

/// `2026-11-26T06:30:37.123Z bounced   0123456789abcdef a@example.com -> b@example.net via relay (attempt 1): 550 5.1.1 no such user [recipient unknown]`
fn plain_line(record: &Record<'_>) -> String {
    let sender = if record.sender.is_empty() {
        "<>"
    } else {
        &record.sender
    };
    let mut line = format!(
        "{} {:<9} {} {} -> {} via {}",
        record.time,
        record.event.as_str(),
        record.id,
        sender,
        record.recipient,
        record.upstream
    );
    if record.attempt > 0 {
        line.push_str(&format!(" (attempt {})", record.attempt));
    }
    if let Some(reply) = &record.reply {
        line.push_str(": ");
        line.push_str(reply);
    }
    if let Some(category) = &record.category {
        line.push_str(&format!(" [{category}]"));
    }
    line
}

pub(crate) const CSV_HEADER: [&str; 15] = [
    "time",
    "event",
    "id",
    "message_id",
    "sender",
    "recipient",
    "upstream",
    "remote",
    "reply",
    "category",
    "attempt",
    "size_bytes",
    "tls",
    "since_received_ms",
    "attempt_ms",
];

/// A record's fields in [`CSV_HEADER`]'s order; absent ones empty.
pub(crate) fn csv_fields(record: &Record<'_>) -> [String; 15] {
    let text = |value: &Option<Cow<'_, str>>| value.as_deref().unwrap_or_default().to_string();
    [
        record.time.to_string(),
        record.event.as_str().to_string(),
        record.id.to_string(),
        text(&record.message_id),
        record.sender.to_string(),
        record.recipient.to_string(),
        record.upstream.to_string(),
        text(&record.remote),
        text(&record.reply),
        text(&record.category),
        record.attempt.to_string(),
        record.size_bytes.to_string(),
        text(&record.tls),
        record.since_received_ms.to_string(),
        record
            .attempt_ms
            .map(|milliseconds| milliseconds.to_string())
            .unwrap_or_default(),
    ]
}

/// One RFC 4180 record: fields separated by commas, a field with a comma, a double
/// quote, CR or LF enclosed in double quotes with its quotes doubled (§2.6, §2.7), and
/// CRLF at the end (§2.1).
pub(crate) fn write_csv_row<W: Write, S: AsRef<str>>(
    out: &mut W,
    fields: &[S],
) -> std::io::Result<()> {
    for (position, field) in fields.iter().enumerate() {
        if position > 0 {
            out.write_all(b",")?;
        }
        let field = field.as_ref();
        if field.contains([',', '"', '\r', '\n']) {
            out.write_all(b"\"")?;
            out.write_all(field.replace('"', "\"\"").as_bytes())?;
            out.write_all(b"\"")?;
        } else {
            out.write_all(field.as_bytes())?;
        }
    }
    out.write_all(b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv<S: AsRef<str>>(fields: &[S]) -> String {
        let mut out = Vec::new();
        write_csv_row(&mut out, fields).expect("write to a Vec");
        String::from_utf8(out).expect("UTF-8")
    }

    #[test]
    fn csv_fields_are_quoted_as_rfc_4180_says() {
        let table: &[(&[&str], &str)] = &[
            (&["a", "b"], "a,b\r\n"),
            (&["", ""], ",\r\n"),
            (
                &["550 5.1.1 no, such user"],
                "\"550 5.1.1 no, such user\"\r\n",
            ),
            (&["say \"hi\""], "\"say \"\"hi\"\"\"\r\n"),
            (&["two\nlines", "x"], "\"two\nlines\",x\r\n"),
            (&["cr\rhere"], "\"cr\rhere\"\r\n"),
            (&["田中@例え.jp", "ü"], "田中@例え.jp,ü\r\n"),
            (&["\"", ","], "\"\"\"\",\",\"\r\n"),
        ];
        for &(fields, expected) in table {
            assert_eq!(csv(fields), expected, "{fields:?}");
        }
    }

    #[test]
    fn until_a_date_takes_the_whole_day() {
        assert_eq!(parse_since("2026-11-26"), Ok(1_795_651_200_000));
        assert_eq!(parse_until("2026-11-26"), Ok(1_795_737_599_999));
        assert_eq!(parse_until("2026-11-26T00:00:00Z"), Ok(1_795_651_200_000));
        assert!(parse_since("26/11/2026").is_err());
    }

    #[test]
    fn filters_match_addresses_case_insensitively_and_the_null_sender() {
        let record = Record {
            time: "2026-11-26T06:30:37.123Z".into(),
            event: EventKind::Bounced,
            id: "0123456789abcdef".into(),
            message_id: None,
            sender: "".into(),
            recipient: "Bob@Example.com".into(),
            upstream: "relay".into(),
            remote: None,
            reply: Some("550 5.1.1 no such user".into()),
            category: Some("recipient unknown".into()),
            attempt: 1,
            size_bytes: 10,
            tls: None,
            since_received_ms: 1,
            attempt_ms: Some(1),
        };
        let filters = |recipient: &str, sender: &str, category: &str| LogQuery {
            sender: Some(sender.to_string()),
            recipient: Some(recipient.to_string()),
            status: Some(EventKind::Bounced),
            category: Some(parse_category(category).expect("category")),
            since: parse_since("2026-11-26").ok(),
            until: parse_until("2026-11-26").ok(),
            ..LogQuery::default()
        };
        assert!(filters("bob@example.com", "<>", "Recipient Unknown").accepts(&record));
        assert!(!filters("bob@example.org", "<>", "recipient unknown").accepts(&record));
        assert!(!filters("bob@example.com", "a@example.com", "recipient unknown").accepts(&record));
        assert!(!filters("bob@example.com", "<>", "dns").accepts(&record));
        // The web page's search: part of either address; the message id.
        let part = |address: &str, id: Option<&str>| LogQuery {
            address: Some(address.to_string()),
            id: id.map(str::to_string),
            ..LogQuery::default()
        };
        assert!(part("EXAMPLE.COM", None).accepts(&record));
        assert!(part("bob@", Some("0123456789ABCDEF")).accepts(&record));
        assert!(!part("alice", None).accepts(&record));
        assert!(!part("bob", Some("0123456789abcdee")).accepts(&record));
        let csv_row = csv(&csv_fields(&record));
        assert_eq!(
            csv_row,
            "2026-11-26T06:30:37.123Z,bounced,0123456789abcdef,,,Bob@Example.com,relay,,550 5.1.1 no such user,recipient unknown,1,10,,1,1\r\n"
        );
    }
}
