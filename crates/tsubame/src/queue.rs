//! `tsubame queue`: look at and act on a running server's delivery queue through its
//! control socket (`<spool directory>/control.sock`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use tsubame_relay::control::{ControlRequest, ControlResponse, MessageSummary};

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
    /// Every queued message with its recipients' state (queued, sending, deferred,
    /// delivered, failed), attempts and last reply.
    List,
    /// One message.
    Show {
        /// Message id (16 hex digits, as in the log and `queue list`).
        id: String,
    },
    /// Retry every deferred recipient now.
    Flush,
    /// Remove a message from the queue without delivering or bouncing it.
    Delete {
        /// Message id.
        id: String,
    },
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
    let request = match &args.command {
        QueueCommand::List => ControlRequest::List,
        QueueCommand::Show { id } => ControlRequest::Show { id: id.clone() },
        QueueCommand::Flush => ControlRequest::Flush,
        QueueCommand::Delete { id } => ControlRequest::Delete { id: id.clone() },
    };
    let response = tsubame_relay::control::request(&directory, &request)
        .map_err(|message| anyhow::anyhow!(message))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&response).context("encoding the answer")?
        );
    }
    match response {
        ControlResponse::Error { message } => {
            if !args.json {
                eprintln!("tsubame: {message}");
            }
            Ok(ExitCode::from(crate::EXIT_ERROR))
        }
        _ if args.json => Ok(ExitCode::SUCCESS),
        ControlResponse::Messages { messages } => {
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
            "{}  {} bytes  from {}  received {}",
            message.id,
            message.size_bytes,
            from,
            crate::inspect::format_unix_ms(message.received_at_unix_ms)
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
