//! `tsubame spool inspect`: what the spool holds, read offline without taking its lock.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tsubame_config::Config;
use tsubame_spool::{MessageId, MessageState, ScanReport, SpooledMessage};

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The spool directory. Default: the one in --config, else ./spool.
    #[arg(long, value_name = "DIR")]
    spool: Option<PathBuf>,
    /// Take the spool directory from this configuration file.
    #[arg(short, long, value_name = "FILE", conflicts_with = "spool")]
    config: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Print one message: its envelope (with the names of any header fields added after
    /// spooling, such as DKIM-Signature), a blank line, then its content exactly as spooled.
    #[arg(long, value_name = "ID")]
    show: Option<String>,
}

/// `spool inspect` found quarantined records.
const EXIT_CORRUPTION: u8 = 3;

pub fn run(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let directory = match (&args.spool, &args.config) {
        (Some(directory), _) => directory.clone(),
        (None, Some(config)) => Config::load(config)?.spool.directory,
        (None, None) => PathBuf::from("./spool"),
    };
    if !directory.is_dir() {
        anyhow::bail!("{} is not a spool directory", directory.display());
    }
    let report = tsubame_spool::scan(&directory)
        .with_context(|| format!("cannot read spool {}", directory.display()))?;

    if let Some(id) = &args.show {
        let id: MessageId = id
            .parse()
            .map_err(|_| anyhow::anyhow!("{id:?} is not a message id (16 hex digits)"))?;
        let message = report
            .messages
            .iter()
            .find(|message| message.id == id)
            .with_context(|| format!("message {id} is not in {}", directory.display()))?;
        let body = tsubame_spool::read_body(&directory, message)?;
        let added = message
            .added_fields
            .map(|location| tsubame_spool::read_added_fields(&directory, message.id, location));
        let mut out = std::io::stdout().lock();
        if args.json {
            let mut value = message_json(message);
            value["body"] = serde_json::Value::String(String::from_utf8_lossy(&body).into_owned());
            if let Some(added) = &added {
                value["added_fields"] = match added {
                    Ok(fields) => serde_json::json!({
                        "names": added_field_names(fields),
                        "size_bytes": fields.len(),
                    }),
                    Err(error) => serde_json::json!({ "error": error.to_string() }),
                };
            }
            writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        } else {
            write_envelope(&mut out, message)?;
            if let Some(added) = &added {
                write_added_fields(&mut out, added.as_deref().map_err(ToString::to_string))?;
            }
            writeln!(out)?;
            out.write_all(&body)?;
        }
        return Ok(exit_code(&report));
    }

    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&report_json(&report))?
        )?;
    } else {
        write_table(&mut out, &report)?;
    }
    Ok(exit_code(&report))
}

fn exit_code(report: &ScanReport) -> ExitCode {
    if report.quarantined.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_CORRUPTION)
    }
}

fn state_name(state: MessageState) -> &'static str {
    match state {
        MessageState::Queued => "queued",
        MessageState::Done => "done",
    }
}

fn message_json(message: &SpooledMessage) -> serde_json::Value {
    serde_json::json!({
        "id": message.id.to_string(),
        "received": format_unix_ms(message.received_at_unix_ms),
        "received_at_unix_ms": message.received_at_unix_ms,
        "client": message.client_address,
        "helo": message.helo,
        "authenticated_user": message.authenticated_user,
        "from": message.mail_from,
        "parameters": message.mail_parameters,
        "recipients": message.recipients,
        "recipient_states": message.recipients.iter().zip(&message.recipient_states).map(|(recipient, state)| serde_json::json!({
            "recipient": recipient,
            "final": state.final_outcome.map(|kind| format!("{kind:?}").to_lowercase()),
            "attempts": state.attempts,
            "last_attempt_unix_ms": state.last_attempt_unix_ms,
        })).collect::<Vec<_>>(),
        "size_bytes": message.body_size_bytes,
        "state": state_name(message.state),
        "segment": message.location.segment,
        "offset": message.location.offset_bytes,
        "added_fields": message.added_fields.map(|location| serde_json::json!({
            "segment": location.segment,
            "offset": location.offset_bytes,
        })),
    })
}

/// The names of the header fields in `fields` (complete fields, each ending in CRLF;
/// continuation lines start with a space or tab, RFC 5322 section 2.2.3), in order.
fn added_field_names(fields: &[u8]) -> Vec<String> {
    fields
        .split(|&byte| byte == b'\n')
        .filter(|line| {
            line.first()
                .is_some_and(|&byte| !matches!(byte, b' ' | b'\t' | b'\r'))
        })
        .map(|line| {
            let name = line.split(|&byte| byte == b':').next().unwrap_or_default();
            String::from_utf8_lossy(name).into_owned()
        })
        .collect()
}

/// One line: the names of the added header fields and their size, or why they could not
/// be read.
fn write_added_fields(out: &mut impl Write, added: Result<&[u8], String>) -> std::io::Result<()> {
    match added {
        Ok(fields) => writeln!(
            out,
            "added fields: {} ({} bytes)",
            added_field_names(fields).join(", "),
            fields.len()
        ),
        Err(error) => writeln!(out, "added fields: unreadable: {error}"),
    }
}

fn report_json(report: &ScanReport) -> serde_json::Value {
    serde_json::json!({
        "messages": report.messages.iter().map(message_json).collect::<Vec<_>>(),
        "quarantined": report.quarantined.iter().map(|record| serde_json::json!({
            "segment": record.segment_path.display().to_string(),
            "offset": record.offset_bytes,
            "reason": record.reason,
        })).collect::<Vec<_>>(),
        "torn_tails": report.torn_tails.iter().map(|tail| serde_json::json!({
            "segment": tail.segment_path.display().to_string(),
            "offset": tail.offset_bytes,
        })).collect::<Vec<_>>(),
        "segments": report.segment_count,
    })
}

fn write_envelope(out: &mut impl Write, message: &SpooledMessage) -> std::io::Result<()> {
    writeln!(out, "id: {}", message.id)?;
    writeln!(
        out,
        "received: {}",
        format_unix_ms(message.received_at_unix_ms)
    )?;
    writeln!(out, "client: {}", message.client_address)?;
    writeln!(out, "helo: {}", message.helo)?;
    if let Some(user) = &message.authenticated_user {
        writeln!(out, "user: {user}")?;
    }
    writeln!(out, "from: <{}>", message.mail_from)?;
    if !message.mail_parameters.is_empty() {
        writeln!(out, "parameters: {}", message.mail_parameters)?;
    }
    for recipient in &message.recipients {
        writeln!(out, "to: <{recipient}>")?;
    }
    // Delivery attempts journalled so far, one line per recipient that has any.
    for (recipient, state) in message.recipients.iter().zip(&message.recipient_states) {
        match (state.final_outcome, state.attempts) {
            (_, 0) => {}
            (Some(kind), attempts) => writeln!(
                out,
                "status: <{recipient}> {} after {attempts} attempt(s)",
                format!("{kind:?}").to_lowercase()
            )?,
            (None, attempts) => {
                writeln!(out, "status: <{recipient}> deferred, {attempts} attempt(s)")?
            }
        }
    }
    writeln!(out, "size: {}", message.body_size_bytes)?;
    writeln!(out, "state: {}", state_name(message.state))
}

fn write_table(out: &mut impl Write, report: &ScanReport) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<16}  {:<24}  {:<7}  {:>9}  {:<30}  RECIPIENTS",
        "ID", "RECEIVED (UTC)", "STATE", "SIZE", "FROM"
    )?;
    for message in &report.messages {
        let first = message.recipients.first().map_or("", String::as_str);
        let more = message.recipients.len().saturating_sub(1);
        let recipients = if more > 0 {
            format!("{first} (+{more})")
        } else {
            first.to_string()
        };
        let from = if message.mail_from.is_empty() {
            "<>"
        } else {
            &message.mail_from
        };
        writeln!(
            out,
            "{:<16}  {:<24}  {:<7}  {:>9}  {:<30}  {}",
            message.id.to_string(),
            format_unix_ms(message.received_at_unix_ms),
            state_name(message.state),
            message.body_size_bytes,
            from,
            recipients
        )?;
    }
    writeln!(
        out,
        "{} message(s) in {} segment(s)",
        report.messages.len(),
        report.segment_count
    )?;
    for tail in &report.torn_tails {
        writeln!(
            out,
            "torn tail (an unacknowledged write cut by a crash): {} at offset {}",
            tail.segment_path.display(),
            tail.offset_bytes
        )?;
    }
    for record in &report.quarantined {
        writeln!(
            out,
            "CORRUPT record quarantined: {} at offset {}: {}",
            record.segment_path.display(),
            record.offset_bytes,
            record.reason
        )?;
    }
    Ok(())
}

/// `2026-11-26T06:30:37.123Z`.
pub(crate) fn format_unix_ms(unix_ms: u64) -> String {
    tsubame_delivery::dsn::rfc3339_ms(unix_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsubame_spool::format::OutcomeKind;
    use tsubame_spool::{RecipientState, RecordLocation};

    #[test]
    fn envelope_shows_journalled_recipient_states() {
        let message = SpooledMessage {
            id: MessageId(0xabc),
            location: RecordLocation {
                segment: 1,
                offset_bytes: 64,
            },
            received_at_unix_ms: 0,
            client_address: "127.0.0.1:40000".to_string(),
            helo: "printer".to_string(),
            authenticated_user: None,
            mail_from: "a@example.com".to_string(),
            mail_parameters: String::new(),
            recipients: vec![
                "b@example.org".to_string(),
                "c@example.org".to_string(),
                "d@example.org".to_string(),
            ],
            body_size_bytes: 10,
            state: MessageState::Queued,
            recipient_states: vec![
                RecipientState {
                    final_outcome: Some(OutcomeKind::Delivered),
                    attempts: 2,
                    last_attempt_unix_ms: Some(5),
                },
                RecipientState {
                    final_outcome: None,
                    attempts: 1,
                    last_attempt_unix_ms: Some(6),
                },
                RecipientState::default(),
            ],
            added_fields: None,
        };
        let mut out = Vec::new();
        write_envelope(&mut out, &message).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("to: <b@example.org>\nto: <c@example.org>\nto: <d@example.org>\n"),
            "{text}"
        );
        assert!(
            text.contains("status: <b@example.org> delivered after 2 attempt(s)\n"),
            "{text}"
        );
        assert!(
            text.contains("status: <c@example.org> deferred, 1 attempt(s)\n"),
            "{text}"
        );
        assert!(!text.contains("status: <d@example.org>"), "{text}");
        let json = message_json(&message);
        assert_eq!(json["recipient_states"][0]["final"], "delivered");
        assert_eq!(json["recipient_states"][1]["attempts"], 1);
        assert!(json["recipient_states"][2]["final"].is_null());
    }

    #[test]
    fn added_fields_show_their_names_and_size() {
        let fields = concat!(
            "DKIM-Signature: v=1; a=rsa-sha256; d=example.com;\r\n\tb=abc\r\n",
            "List-Unsubscribe: <https://example.com/u>\r\n",
        )
        .as_bytes();
        assert_eq!(
            added_field_names(fields),
            ["DKIM-Signature", "List-Unsubscribe"]
        );
        assert!(added_field_names(b"").is_empty());
        let mut out = Vec::new();
        write_added_fields(&mut out, Ok(fields)).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!(
                "added fields: DKIM-Signature, List-Unsubscribe ({} bytes)\n",
                fields.len()
            )
        );
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_unix_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_unix_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(
            format_unix_ms(1_795_674_637_123),
            "2026-11-26T06:30:37.123Z"
        );
    }
}
