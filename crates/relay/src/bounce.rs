//! Bounces: a delivery status notification to the original sender. Placeholder until
//! the RFC 3464 builder lands: a plain-text notice.

use tsubame_spool::{Spool, SpoolError};

use crate::job::{MessageMeta, RecipientReport};

pub(crate) fn is_bounceable(mail_from: &str) -> bool {
    !mail_from.is_empty()
}

pub(crate) fn build(
    spool: &Spool,
    hostname: &str,
    meta: &MessageMeta,
    failed: &[&RecipientReport],
    now_ms: u64,
    sequence: u64,
) -> Result<Vec<u8>, SpoolError> {
    let _ = (spool, now_ms, sequence);
    let mut text = format!(
        "From: MAILER-DAEMON@{hostname}\r\nTo: <{}>\r\nSubject: Undelivered Mail Returned to Sender\r\n\r\n",
        meta.message.mail_from
    );
    for report in failed {
        let address = meta
            .message
            .recipients
            .get(report.recipient.0 as usize)
            .map_or("", String::as_str);
        text.push_str(&format!("<{address}>: {}\r\n", report.detail));
    }
    Ok(text.into_bytes())
}
