//! `tsubame queue`: look at and act on a running server's delivery queue through its
//! control socket (`<spool directory>/control.sock`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use tsubame_relay::control::{
    Action, ControlRequest, ControlResponse, FILTER_STATUSES, Filter, IDS_PER_REQUEST_MAX,
    MessageSummary,
};

#[derive(Debug, clap::Args)]
pub struct QueueArgs {
    #[command(subcommand)]
    command: QueueCommand,
    /// The running server's configuration file (its spool directory locates the control
    /// socket). Without it and without --spool, the embedded default's ./spool.
    #[arg(short, long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// The running server's spool directory.
    #[arg(long, value_name = "DIR", global = true)]
    spool: Option<PathBuf>,
    /// Print the server's answer as JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
enum QueueCommand {
    /// Queued messages with their recipients' state (queued, sending, deferred,
    /// delivered, failed), attempts and last reply; the filters narrow it.
    List {
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// One message.
    Show {
        /// Message id (16 hex digits, as in the log and `queue list`).
        id: String,
    },
    /// Retry deferred recipients now: of the given messages, of those the filters
    /// select, or (with neither) of every message.
    Flush(Selection),
    /// Remove messages from the queue without delivering or bouncing them (journalled:
    /// they stay deleted after a restart).
    Delete(Selection),
    /// Attempt nothing for these messages (nor expire them) until released; holds last
    /// across restarts.
    Hold(Selection),
    /// Let held messages go again.
    Release(Selection),
}

/// `list`'s filters; every one given must hold.
#[derive(Debug, Clone, Default, clap::Args)]
struct FilterArgs {
    /// Messages with a recipient at this domain.
    #[arg(long, value_name = "DOMAIN")]
    recipient_domain: Option<String>,
    /// Messages from this envelope sender: an address, `@domain`, or `<>` for bounces.
    #[arg(long, value_name = "ADDRESS")]
    sender: Option<String>,
    /// Messages received at least this long ago: seconds, or with a unit (90s, 30m, 6h,
    /// 2d).
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    older_than: Option<u64>,
    /// Messages on hold (`held`), or with a recipient in this state (`queued`,
    /// `sending`, `deferred`).
    #[arg(long, value_name = "STATUS", value_parser = clap::builder::PossibleValuesParser::new(FILTER_STATUSES))]
    status: Option<String>,
}

impl FilterArgs {
    fn filter(&self) -> Filter {
        Filter {
            recipient_domain: self.recipient_domain.clone(),
            sender: self.sender.clone(),
            older_than_secs: self.older_than,
            status: self.status.clone(),
        }
    }
}

/// Which messages an action takes: ids, or filters, or `--all`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:\n  \
    tsubame queue hold --recipient-domain example.com\n  \
    tsubame queue release --status held --older-than 1h\n  \
    tsubame queue delete --sender '<>' --older-than 2d\n  \
    tsubame queue flush 0006433a1b2c3d4e\n\n\
    With filters, the messages matching when the command starts are acted on in batches of 1000, with a progress line on standard error.")]
struct Selection {
    /// Message ids (16 hex digits).
    ids: Vec<String>,
    #[command(flatten)]
    filter: FilterArgs,
    /// Every queued message (needed for delete, hold and release without ids or
    /// filters, so that none of them empties the queue by accident).
    #[arg(long)]
    all: bool,
}

/// `90`, `90s`, `30m`, `6h`, `2d` → seconds.
pub(crate) fn parse_age(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().last() {
        Some((at, unit)) if unit.is_ascii_alphabetic() => (&text[..at], unit),
        _ => (text, 's'),
    };
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not an age such as 90s, 30m, 6h or 2d"))?;
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    value
        .checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too long an age"))
}

/// The spool directory of the running server a command talks to (its sockets live
/// there): `--spool`, else the one `--config` names, else the embedded default's.
pub(crate) fn running_server_spool(
    spool: Option<&Path>,
    config: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    Ok(match (spool, config) {
        (Some(spool), _) => spool.to_path_buf(),
        (None, Some(path)) => tsubame_config::Config::load(path)?.spool.directory,
        (None, None) => tsubame_config::Config::embedded_default()?.spool.directory,
    })
}

pub fn run(args: QueueArgs) -> anyhow::Result<ExitCode> {
    let directory = running_server_spool(args.spool.as_deref(), args.config.as_deref())?;
    let (action, selection) = match &args.command {
        QueueCommand::List { filter } => {
            let request = ControlRequest::List {
                filter: filter.filter(),
                page: None,
            };
            return answer(&directory, &request, args.json);
        }
        QueueCommand::Show { id } => {
            return answer(
                &directory,
                &ControlRequest::Show { id: id.clone() },
                args.json,
            );
        }
        QueueCommand::Flush(selection) => (Action::Flush, selection),
        QueueCommand::Delete(selection) => (Action::Delete, selection),
        QueueCommand::Hold(selection) => (Action::Hold, selection),
        QueueCommand::Release(selection) => (Action::Release, selection),
    };
    let filter = selection.filter.filter();
    let nothing_chosen = selection.ids.is_empty() && filter.is_empty();
    if nothing_chosen && action == Action::Flush {
        // The historical meaning of a bare flush: every deferred recipient.
        return answer(&directory, &ControlRequest::Flush, args.json);
    }
    if nothing_chosen && !selection.all {
        anyhow::bail!(
            "name message ids, give a filter (--recipient-domain, --sender, --older-than, --status), or pass --all"
        );
    }
    if !selection.ids.is_empty() && (!filter.is_empty() || selection.all) {
        anyhow::bail!("give message ids or filters/--all, not both");
    }
    if let [id] = selection.ids.as_slice()
        && action == Action::Delete
    {
        return answer(
            &directory,
            &ControlRequest::Delete { id: id.clone() },
            args.json,
        );
    }
    let ids = if selection.ids.is_empty() {
        match request(&directory, &ControlRequest::List { filter, page: None })? {
            ControlResponse::Messages { messages, .. } => {
                messages.into_iter().map(|message| message.id).collect()
            }
            ControlResponse::Error { message } => anyhow::bail!(message),
            other => anyhow::bail!("unexpected answer to list: {other:?}"),
        }
    } else {
        selection.ids.clone()
    };
    let total = ids.len();
    let (mut messages, mut recipients) = (0usize, 0usize);
    let mut missing: Vec<String> = Vec::new();
    let bulk = total > IDS_PER_REQUEST_MAX;
    for batch in ids.chunks(IDS_PER_REQUEST_MAX) {
        let request = ControlRequest::Apply {
            action,
            ids: batch.to_vec(),
        };
        match self::request(&directory, &request)? {
            ControlResponse::Applied {
                messages: done,
                recipients: pending,
                missing: gone,
                ..
            } => {
                messages += done;
                recipients += pending;
                missing.extend(gone);
            }
            ControlResponse::Error { message } => anyhow::bail!(message),
            other => anyhow::bail!("unexpected answer: {other:?}"),
        }
        if bulk {
            eprintln!(
                "{} {messages} of {total} message(s) so far",
                action.done_word()
            );
        }
    }
    if args.json {
        let summary = ControlResponse::Applied {
            action,
            messages,
            recipients,
            missing,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).context("encoding the answer")?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} {messages} message(s) ({recipients} recipient(s) pending)",
        action.done_word()
    );
    if !missing.is_empty() {
        eprintln!(
            "tsubame: {} not queued (any more): {}",
            missing.len(),
            missing.join(" ")
        );
    }
    // Ids the caller named that are not queued are an error; messages that finished
    // between the listing and the action are not.
    if !missing.is_empty() && !selection.ids.is_empty() {
        return Ok(ExitCode::from(crate::EXIT_ERROR));
    }
    Ok(ExitCode::SUCCESS)
}

fn request(directory: &Path, request: &ControlRequest) -> anyhow::Result<ControlResponse> {
    tsubame_relay::control::request(directory, request).map_err(|message| anyhow::anyhow!(message))
}

/// Sends one request and prints its answer.
fn answer(directory: &Path, request: &ControlRequest, json: bool) -> anyhow::Result<ExitCode> {
    let response = self::request(directory, request)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&response).context("encoding the answer")?
        );
    }
    match response {
        ControlResponse::Error { message } => {
            if !json {
                eprintln!("tsubame: {message}");
            }
            Ok(ExitCode::from(crate::EXIT_ERROR))
        }
        _ if json => Ok(ExitCode::SUCCESS),
        ControlResponse::Messages { messages, .. } => {
            print_messages(&messages);
            Ok(ExitCode::SUCCESS)
        }
        ControlResponse::Flushed { recipients } => {
            println!("{recipients} deferred recipient(s) will be retried now");
            Ok(ExitCode::SUCCESS)
        }
        ControlResponse::Deleted { id, recipients } => {
            println!("deleted {id} ({recipients} recipient(s) no longer queued)");
            Ok(ExitCode::SUCCESS)
        }
        ControlResponse::Applied {
            action, messages, ..
        } => {
            println!("{} {messages} message(s)", action.done_word());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_messages(messages: &[MessageSummary]) {
    if messages.is_empty() {
        println!("queue is empty");
        return;
    }
    for message in messages {
        let from = if message.mail_from.is_empty() {
            "<>"
        } else {
            &message.mail_from
        };
        println!(
            "{}  {} bytes  from {}  received {}{}",
            message.id,
            message.size_bytes,
            from,
            crate::inspect::format_unix_ms(message.received_at_unix_ms),
            if message.held { "  HELD" } else { "" }
        );
        for recipient in &message.recipients {
            print!(
                "    {}  {}  via {}  attempts {}",
                recipient.address, recipient.state, recipient.upstream, recipient.attempts
            );
            match &recipient.last_reply {
                Some(reply) => println!("  last: {reply}"),
                None => println!(),
            }
        }
    }
    println!("{} message(s)", messages.len());
}

#[cfg(test)]
mod tests {
    use super::parse_age;

    #[test]
    fn ages_take_a_unit() {
        assert_eq!(parse_age("90"), Ok(90));
        assert_eq!(parse_age("90s"), Ok(90));
        assert_eq!(parse_age("30m"), Ok(1800));
        assert_eq!(parse_age("6h"), Ok(21_600));
        assert_eq!(parse_age("2d"), Ok(172_800));
        for bad in ["", "h", "1w", "-1h", "1.5h", "99999999999999999999d"] {
            assert!(parse_age(bad).is_err(), "{bad:?}");
        }
    }
}
