//! What the dispatcher and the workers pass each other.

use std::sync::Arc;

use tsubame_delivery::BodyType;
use tsubame_queue::{JobId, Outcome, RecipientIndex};
use tsubame_spool::SpooledMessage;

/// A queued message as workers see it: immutable, shared by every job of the message.
#[derive(Debug)]
pub(crate) struct MessageMeta {
    pub message: SpooledMessage,
    pub body_type: BodyType,
    pub smtputf8: bool,
    /// Header fields to send before the body that the spool could not store (see
    /// `signing`); normally `None`, the fields being in the spool at
    /// `message.added_fields`.
    pub added_in_memory: Option<Arc<[u8]>>,
}

impl MessageMeta {
    pub fn new(message: SpooledMessage, added_in_memory: Option<Arc<[u8]>>) -> Self {
        // The server stores the MAIL FROM parameters it accepted as text (`BODY=8BITMIME
        // SMTPUTF8`); they say what the upstream must offer (RFC 6152, RFC 6531).
        let mut body_type = BodyType::SevenBit;
        let mut smtputf8 = false;
        for parameter in message.mail_parameters.split_ascii_whitespace() {
            if parameter.eq_ignore_ascii_case("BODY=8BITMIME") {
                body_type = BodyType::EightBitMime;
            } else if parameter.eq_ignore_ascii_case("SMTPUTF8") {
                smtputf8 = true;
            }
        }
        Self {
            message,
            body_type,
            smtputf8,
            added_in_memory,
        }
    }
}

/// One job for a worker: a message and the recipients to try in one go.
#[derive(Debug)]
pub(crate) struct WorkItem {
    pub job: JobId,
    pub meta: Arc<MessageMeta>,
    /// Non-empty. Recipient indexes into `meta.message.recipients`, with their attempt
    /// number (1 for the first).
    pub recipients: Vec<(RecipientIndex, u32)>,
}

/// How one recipient's attempt went, as the worker saw it.
#[derive(Debug, Clone)]
pub(crate) struct RecipientReport {
    pub recipient: RecipientIndex,
    pub outcome: Outcome,
    /// The upstream's reply (`550 5.1.1 no such user`) or our own explanation; for the
    /// journal, the log and a bounce's Diagnostic-Code.
    pub detail: String,
    /// Enhanced status code for a bounce (`5.1.1`).
    pub status: String,
    /// The host that answered, when one did.
    pub remote: Option<String>,
    /// The connection's TLS version and cipher suite (`TLSv1.3
    /// TLS13_AES_256_GCM_SHA384`) when it was encrypted; `None` in plain text or when
    /// no transaction ran.
    pub tls: Option<String>,
    /// Deferred because the upstream cannot take it now (its quota, its rate limit):
    /// the upstream's `fallback`, if it has one, gets it at once.
    pub spill: bool,
}

/// What a worker sends back when a job is over. One entry per recipient of the job.
#[derive(Debug)]
pub(crate) struct Report {
    pub job: JobId,
    pub message: Arc<MessageMeta>,
    pub upstream: usize,
    pub recipients: Vec<RecipientReport>,
    /// How long the job took at the worker, connection set-up included.
    pub attempt_ms: u64,
    /// The message's Message-ID header field, when the worker read the message.
    pub message_id: Option<String>,
}
