//! Bounces: a delivery status notification (RFC 3464) to the original sender, built
//! by `tsubame_delivery::dsn` and queued like any other message, from the null sender.

use tsubame_delivery::dsn::{DsnAction, DsnInput, DsnRecipient, build_dsn, needs_smtputf8};
use tsubame_spool::{Spool, SpoolError};

use crate::job::{MessageMeta, RecipientReport};

pub(crate) use tsubame_delivery::dsn::is_bounceable;

/// A bounce ready to spool.
#[derive(Debug)]
pub(crate) struct Bounce {
    pub content: Vec<u8>,
    /// MAIL FROM parameters the bounce needs (`SMTPUTF8 BODY=8BITMIME` when an address
    /// is not ASCII, RFC 6533), empty otherwise.
    pub mail_parameters: &'static str,
}

/// Builds the bounce for `failed` recipients of `meta`'s message. Reads the original
/// from the spool for its header section.
pub(crate) fn build(
    spool: &Spool,
    hostname: &str,
    meta: &MessageMeta,
    failed: &[&RecipientReport],
    now_ms: u64,
    sequence: u64,
) -> Result<Bounce, SpoolError> {
    let original = crate::body::load(spool, &meta.message)?;
    let message = &meta.message;
    let recipients: Vec<DsnRecipient<'_>> = failed
        .iter()
        .map(|report| DsnRecipient {
            address: message
                .recipients
                .get(report.recipient.0 as usize)
                .map_or("", String::as_str),
            action: DsnAction::Failed,
            status: &report.status,
            remote_mta: report.remote.as_deref(),
            diagnostic: Some(&report.detail),
            last_attempt_unix_ms: Some(now_ms),
        })
        .collect();
    let queue_id = message.id.to_string();
    let message_id = format!("{queue_id}.bounce{sequence}.{now_ms}@{hostname}");
    let input = DsnInput {
        reporting_mta: hostname,
        original_mail_from: &message.mail_from,
        arrival_unix_ms: message.received_at_unix_ms,
        now_unix_ms: now_ms,
        queue_id: &queue_id,
        message_id: &message_id,
        original_message: &original,
        recipients: &recipients,
    };
    let mail_parameters = if needs_smtputf8(&input) {
        "SMTPUTF8 BODY=8BITMIME"
    } else {
        ""
    };
    Ok(Bounce {
        content: build_dsn(&input),
        mail_parameters,
    })
}
