//! One SMTP session as a state machine over bytes: no sockets, no clock, no spool.
//!
//! The event loop feeds received bytes to [`Session::process`], writes what it puts in
//! the output buffer, and acts on the [`Event`] it returns: when a message is complete it
//! appends it to the spool and later reports the commit with [`Session::committed`] or
//! [`Session::refuse_message`]. While a message waits for its commit the session reads
//! no further commands, so pipelined replies stay in order (RFC 2920 §3.1).

use tsubame_smtp_proto::command::{Body, Command, MailParameters, ReversePath};
use tsubame_smtp_proto::line::{LineError, next_line, skip_past_line_end};
use tsubame_smtp_proto::reply::{EnhancedCode, Reply};
use tsubame_smtp_proto::{BdatReceiver, BdatStatus, DataOutcome, DataReceiver, DataStatus};

use tsubame_config::Limits;

/// Replies used in more than one place, with their RFC 3463 codes.
pub(crate) mod replies {
    use super::{EnhancedCode, Reply};

    pub const OK: Reply = Reply::new(250, EnhancedCode::new(2, 0, 0), "Ok");
    pub const SENDER_OK: Reply = Reply::new(250, EnhancedCode::new(2, 1, 0), "Sender ok");
    pub const RECIPIENT_OK: Reply = Reply::new(250, EnhancedCode::new(2, 1, 5), "Recipient ok");
    pub const START_DATA: Reply = Reply {
        code: 354,
        enhanced: None,
        text: std::borrow::Cow::Borrowed("End data with <CR><LF>.<CR><LF>"),
    };
    pub const BYE: Reply = Reply::new(221, EnhancedCode::new(2, 0, 0), "Bye");
    pub const VRFY: Reply = Reply::new(
        252,
        EnhancedCode::new(2, 5, 0),
        "Cannot VRFY user, but will accept message and attempt delivery",
    );
    pub const EXPN: Reply = Reply::new(502, EnhancedCode::new(5, 5, 1), "EXPN is not supported");
    pub const HELP: Reply = Reply::new(
        214,
        EnhancedCode::new(2, 0, 0),
        "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP\nSee RFC 5321",
    );
    pub const HELO_FIRST: Reply =
        Reply::new(503, EnhancedCode::new(5, 5, 1), "Send EHLO or HELO first");
    pub const NESTED_MAIL: Reply =
        Reply::new(503, EnhancedCode::new(5, 5, 1), "Sender already specified");
    pub const MAIL_FIRST: Reply =
        Reply::new(503, EnhancedCode::new(5, 5, 1), "Send MAIL FROM first");
    /// RFC 3030 §3: DATA may not follow a BDAT of the same transaction.
    pub const DATA_AFTER_BDAT: Reply = Reply::new(
        503,
        EnhancedCode::new(5, 5, 1),
        "DATA may not follow BDAT in one transaction",
    );
    pub const NO_VALID_RECIPIENTS: Reply =
        Reply::new(554, EnhancedCode::new(5, 5, 1), "No valid recipients");
    pub const RELAY_DENIED: Reply = Reply::new(
        550,
        EnhancedCode::new(5, 7, 1),
        "Relaying denied: your address is not allowed to relay",
    );
    pub const TOO_MANY_RECIPIENTS: Reply =
        Reply::new(452, EnhancedCode::new(4, 5, 3), "Too many recipients");
    pub const MESSAGE_TOO_BIG: Reply = Reply::new(
        552,
        EnhancedCode::new(5, 3, 4),
        "Message exceeds fixed maximum message size",
    );
    pub const LINE_TOO_LONG_IN_TEXT: Reply = Reply::new(
        554,
        EnhancedCode::new(5, 6, 0),
        "Message has a line longer than this server accepts",
    );
    pub const COMMAND_LINE_TOO_LONG: Reply =
        Reply::new(500, EnhancedCode::new(5, 5, 6), "Command line too long");
    pub const NEEDS_SMTPUTF8: Reply = Reply::new(
        553,
        EnhancedCode::new(5, 6, 7),
        "Non-ASCII address requires the SMTPUTF8 parameter",
    );
    pub const PARAMETERS_NEED_EHLO: Reply = Reply::new(
        555,
        EnhancedCode::new(5, 5, 4),
        "MAIL parameters require EHLO",
    );
    pub const AUTH_UNAVAILABLE: Reply =
        Reply::new(502, EnhancedCode::new(5, 5, 1), "AUTH is not available");
    pub const TLS_UNAVAILABLE: Reply =
        Reply::new(502, EnhancedCode::new(5, 5, 1), "STARTTLS is not available");
    pub const TOO_MANY_ERRORS: Reply = Reply::new(
        421,
        EnhancedCode::new(4, 7, 0),
        "Too many errors, closing connection",
    );
    pub const TOO_MANY_COMMANDS: Reply = Reply::new(
        421,
        EnhancedCode::new(4, 7, 0),
        "Too many commands, closing connection",
    );
    pub const TIMEOUT: Reply = Reply::new(
        421,
        EnhancedCode::new(4, 4, 2),
        "Timeout, closing connection",
    );
    pub const DATA_TIMEOUT: Reply = Reply::new(
        421,
        EnhancedCode::new(4, 4, 2),
        "Message transfer took too long, closing connection",
    );
    pub const TOO_MANY_CONNECTIONS: Reply = Reply::new(
        421,
        EnhancedCode::new(4, 7, 0),
        "Too many connections, try again later",
    );
    pub const TOO_MANY_CONNECTIONS_FROM_YOU: Reply = Reply::new(
        421,
        EnhancedCode::new(4, 7, 0),
        "Too many connections from your address, try again later",
    );
    pub const SHUTTING_DOWN: Reply =
        Reply::new(421, EnhancedCode::new(4, 3, 2), "Server shutting down");
    pub const DISK_FULL: Reply = Reply::new(
        452,
        EnhancedCode::new(4, 3, 1),
        "Insufficient system storage, try again later",
    );
    pub const LOCAL_ERROR: Reply = Reply::new(
        451,
        EnhancedCode::new(4, 3, 0),
        "Local error in processing, try again later",
    );
}

/// What the session needs to know about where it runs.
#[derive(Debug, Clone, Copy)]
pub struct SessionContext<'a> {
    pub hostname: &'a str,
    pub limits: &'a Limits,
    /// The client is inside the listener's `relay_networks`.
    pub may_relay: bool,
}

/// What the loop must do after [`Session::process`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Everything usable was consumed; wait for more input.
    NeedInput,
    /// A message is complete: take it with [`Session::message`] and spool it.
    MessageReady,
    /// The session waits for the commit of its message; feed no input until then.
    AwaitingCommit,
    /// Flush the output and close the connection.
    Close,
}

/// Where a deadline comes from, so the loop can choose the timeout reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    Command,
    Content,
    Commit,
}

#[derive(Debug)]
enum Phase {
    Command,
    /// Skipping the rest of a command line that exceeded the limit.
    SkippingLongLine,
    Data(DataReceiver),
    /// `reply_after` is set when the chunk is read only to be discarded (no transaction);
    /// the reply is sent once all of its bytes are consumed.
    Bdat {
        receiver: BdatReceiver,
        last: bool,
        chunk_size_bytes: u64,
        reply_after: Option<Reply>,
    },
    MessageReady,
    AwaitingCommit,
    Closed,
}

#[derive(Debug)]
struct Helo {
    name: String,
    extended: bool,
}

#[derive(Debug)]
struct Transaction {
    /// Empty for the null reverse path.
    mail_from: String,
    /// Parameters as spooled (`BODY=8BITMIME SMTPUTF8`).
    parameters: String,
    smtputf8: bool,
    /// Invariant: `recipients.len() <= limits.max_recipients`.
    recipients: Vec<String>,
    /// BDAT state kept across chunks of this message.
    bdat: Option<BdatReceiver>,
}

/// A complete message waiting to be spooled. Borrowed from the session.
#[derive(Debug)]
pub struct MessageParts<'a> {
    pub helo: &'a str,
    pub mail_from: &'a str,
    pub mail_parameters: &'a str,
    pub recipients: &'a [String],
    pub body: &'a [u8],
}

/// One client's SMTP session.
#[derive(Debug)]
pub struct Session {
    phase: Phase,
    helo: Option<Helo>,
    transaction: Option<Transaction>,
    /// The message content being received. Kept between messages to reuse its
    /// allocation unless it grew beyond [`BODY_CAPACITY_KEPT_BYTES`].
    body: Vec<u8>,
    commands: u32,
    errors: u32,
}

/// A body buffer larger than this is freed after its message, so idle connections stay
/// small (1,000 idle connections must fit in well under 200 MiB).
const BODY_CAPACITY_KEPT_BYTES: usize = 64 * 1024;

impl Session {
    pub fn new() -> Self {
        Self {
            phase: Phase::Command,
            helo: None,
            transaction: None,
            body: Vec::new(),
            commands: 0,
            errors: 0,
        }
    }

    /// The greeting sent when the connection opens.
    pub fn greeting(hostname: &str, out: &mut Vec<u8>) {
        Reply::owned(220, None, format!("{hostname} ESMTP tsubame")).write_to(out);
    }

    /// What the session is waiting for, to pick the timeout.
    pub fn waiting(&self) -> Waiting {
        match self.phase {
            Phase::Data(_) | Phase::Bdat { .. } => Waiting::Content,
            Phase::MessageReady | Phase::AwaitingCommit => Waiting::Commit,
            Phase::Command | Phase::SkippingLongLine | Phase::Closed => Waiting::Command,
        }
    }

    /// Consumes as much of `input` as the current phase allows, writing replies to
    /// `out`. Returns the number of bytes consumed and what to do next.
    pub fn process(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        context: &SessionContext<'_>,
    ) -> (usize, Event) {
        let mut consumed = 0;
        loop {
            let rest = input.get(consumed..).unwrap_or_default();
            match &mut self.phase {
                Phase::Closed => return (consumed, Event::Close),
                Phase::MessageReady => return (consumed, Event::MessageReady),
                Phase::AwaitingCommit => return (consumed, Event::AwaitingCommit),
                Phase::SkippingLongLine => match skip_past_line_end(rest) {
                    Some(length) => {
                        consumed += length;
                        self.phase = Phase::Command;
                    }
                    None => return (input.len(), Event::NeedInput),
                },
                Phase::Data(receiver) => match receiver.feed(rest, &mut self.body) {
                    DataStatus::NeedMore => return (input.len(), Event::NeedInput),
                    DataStatus::Done {
                        consumed: used,
                        outcome,
                    } => {
                        consumed += used;
                        match outcome {
                            DataOutcome::Complete => self.phase = Phase::MessageReady,
                            DataOutcome::TooLarge => {
                                self.fail_message(replies::MESSAGE_TOO_BIG, out, context)
                            }
                            DataOutcome::LineTooLong => {
                                self.fail_message(replies::LINE_TOO_LONG_IN_TEXT, out, context)
                            }
                        }
                    }
                },
                Phase::Bdat {
                    receiver,
                    last,
                    chunk_size_bytes,
                    reply_after,
                } => match receiver.feed(rest, &mut self.body) {
                    BdatStatus::NeedMore => return (input.len(), Event::NeedInput),
                    BdatStatus::ChunkDone { consumed: used } => {
                        consumed += used;
                        let (last, chunk_size_bytes, reply_after) =
                            (*last, *chunk_size_bytes, reply_after.take());
                        let Phase::Bdat { receiver, .. } =
                            std::mem::replace(&mut self.phase, Phase::Command)
                        else {
                            unreachable!("matched Bdat above");
                        };
                        self.chunk_done(
                            receiver,
                            last,
                            chunk_size_bytes,
                            reply_after,
                            out,
                            context,
                        );
                    }
                },
                Phase::Command => {
                    let line = match next_line(rest, context.limits.max_command_line_bytes) {
                        Ok(Some(line)) => line,
                        Ok(None) => return (consumed, Event::NeedInput),
                        Err(LineError::TooLong { .. }) => {
                            self.phase = Phase::SkippingLongLine;
                            self.error(replies::COMMAND_LINE_TOO_LONG, out, context);
                            continue;
                        }
                    };
                    let text = rest.get(..line.content_bytes).unwrap_or_default();
                    consumed += line.length_bytes;
                    self.commands = self.commands.saturating_add(1);
                    if self.commands > context.limits.max_commands_per_session {
                        replies::TOO_MANY_COMMANDS.write_to(out);
                        self.phase = Phase::Closed;
                        continue;
                    }
                    self.command(text, out, context);
                }
            }
        }
    }

    fn command(&mut self, line: &[u8], out: &mut Vec<u8>, context: &SessionContext<'_>) {
        let command = match tsubame_smtp_proto::parse_command(line) {
            Ok(command) => command,
            Err(error) => return self.error(error.reply(), out, context),
        };
        match command {
            Command::Ehlo { domain } | Command::Helo { domain } => {
                let extended = matches!(command, Command::Ehlo { .. });
                self.helo = Some(Helo {
                    name: domain.to_string(),
                    extended,
                });
                self.reset_transaction();
                if extended {
                    self.ehlo_reply(domain, context).write_to(out);
                } else {
                    Reply::owned(250, None, context.hostname.to_string()).write_to(out);
                }
            }
            Command::Mail { from, parameters } => self.mail(from, parameters, out, context),
            Command::Rcpt { to, .. } => {
                let Some(transaction) = self.transaction.as_mut() else {
                    return self.error(replies::MAIL_FIRST, out, context);
                };
                if to.utf8 && !transaction.smtputf8 {
                    return self.error(replies::NEEDS_SMTPUTF8, out, context);
                }
                if !context.may_relay {
                    return self.error(replies::RELAY_DENIED, out, context);
                }
                if transaction.recipients.len() >= context.limits.max_recipients {
                    return self.error(replies::TOO_MANY_RECIPIENTS, out, context);
                }
                transaction.recipients.push(to.mailbox.to_string());
                replies::RECIPIENT_OK.write_to(out);
            }
            Command::Data
                if self
                    .transaction
                    .as_ref()
                    .is_some_and(|transaction| transaction.bdat.is_some()) =>
            {
                self.error(replies::DATA_AFTER_BDAT, out, context)
            }
            Command::Data => match self.transaction_state() {
                Err(reply) => self.error(reply, out, context),
                Ok(()) => {
                    self.body.clear();
                    let limits = context.limits;
                    let max_message_bytes =
                        usize::try_from(limits.max_message_size_bytes).unwrap_or(usize::MAX);
                    self.phase = Phase::Data(DataReceiver::new(
                        max_message_bytes,
                        limits.max_text_line_bytes,
                    ));
                    replies::START_DATA.write_to(out);
                }
            },
            Command::Bdat {
                chunk_size_bytes,
                last,
            } => self.bdat(chunk_size_bytes, last, context),
            Command::Rset => {
                self.reset_transaction();
                replies::OK.write_to(out);
            }
            Command::Noop => replies::OK.write_to(out),
            Command::Quit => {
                replies::BYE.write_to(out);
                self.phase = Phase::Closed;
            }
            Command::Vrfy { .. } => replies::VRFY.write_to(out),
            Command::Expn { .. } => self.error(replies::EXPN, out, context),
            Command::Help { .. } => replies::HELP.write_to(out),
            Command::Auth { .. } => self.error(replies::AUTH_UNAVAILABLE, out, context),
            Command::StartTls => self.error(replies::TLS_UNAVAILABLE, out, context),
        }
    }

    fn ehlo_reply(&self, client_name: &str, context: &SessionContext<'_>) -> Reply {
        let text = format!(
            "{} greets {}\nPIPELINING\nSIZE {}\n8BITMIME\nSMTPUTF8\nENHANCEDSTATUSCODES\nCHUNKING\nHELP",
            context.hostname,
            sanitize_for_reply(client_name),
            context.limits.max_message_size_bytes
        );
        Reply::owned(250, None, text)
    }

    fn mail(
        &mut self,
        from: ReversePath<'_>,
        parameters: MailParameters<'_>,
        out: &mut Vec<u8>,
        context: &SessionContext<'_>,
    ) {
        let Some(helo) = &self.helo else {
            return self.error(replies::HELO_FIRST, out, context);
        };
        if self.transaction.is_some() {
            return self.error(replies::NESTED_MAIL, out, context);
        }
        if !helo.extended && parameters != MailParameters::default() {
            return self.error(replies::PARAMETERS_NEED_EHLO, out, context);
        }
        if parameters
            .size_bytes
            .is_some_and(|size| size > context.limits.max_message_size_bytes)
        {
            return self.error(replies::MESSAGE_TOO_BIG, out, context);
        }
        let mail_from = match from {
            ReversePath::Null => String::new(),
            ReversePath::Mailbox(address) => {
                if address.utf8 && !parameters.smtputf8 {
                    return self.error(replies::NEEDS_SMTPUTF8, out, context);
                }
                address.mailbox.to_string()
            }
        };
        let mut spooled_parameters = Vec::new();
        match parameters.body {
            Some(Body::EightBitMime) => spooled_parameters.push("BODY=8BITMIME".to_string()),
            Some(Body::SevenBit) => spooled_parameters.push("BODY=7BIT".to_string()),
            None => {}
        }
        if parameters.smtputf8 {
            spooled_parameters.push("SMTPUTF8".to_string());
        }
        if let Some(size) = parameters.size_bytes {
            spooled_parameters.push(format!("SIZE={size}"));
        }
        self.transaction = Some(Transaction {
            mail_from,
            parameters: spooled_parameters.join(" "),
            smtputf8: parameters.smtputf8,
            recipients: Vec::new(),
            bdat: None,
        });
        replies::SENDER_OK.write_to(out);
    }

    /// `Ok` when a transaction with at least one recipient is open.
    fn transaction_state(&self) -> Result<(), Reply> {
        match &self.transaction {
            None => Err(replies::MAIL_FIRST),
            Some(transaction) if transaction.recipients.is_empty() => {
                Err(replies::NO_VALID_RECIPIENTS)
            }
            Some(_) => Ok(()),
        }
    }

    fn bdat(&mut self, chunk_size_bytes: u64, last: bool, context: &SessionContext<'_>) {
        let max_message_bytes =
            usize::try_from(context.limits.max_message_size_bytes).unwrap_or(usize::MAX);
        // RFC 3030 §3: the chunk's bytes follow the command whatever its fate, so a
        // refused BDAT still reads (and discards) them before it replies.
        let (mut receiver, reply_after) = match self.transaction_state() {
            Err(reply) => (BdatReceiver::new(0), Some(reply)),
            Ok(()) => {
                let transaction = self.transaction.as_mut();
                match transaction.and_then(|transaction| transaction.bdat.take()) {
                    Some(receiver) => (receiver, None),
                    None => {
                        self.body.clear();
                        (BdatReceiver::new(max_message_bytes), None)
                    }
                }
            }
        };
        receiver.start_chunk(chunk_size_bytes);
        self.phase = Phase::Bdat {
            receiver,
            last,
            chunk_size_bytes,
            reply_after,
        };
    }

    fn chunk_done(
        &mut self,
        mut receiver: BdatReceiver,
        last: bool,
        chunk_size_bytes: u64,
        reply_after: Option<Reply>,
        out: &mut Vec<u8>,
        context: &SessionContext<'_>,
    ) {
        if let Some(reply) = reply_after {
            self.body.clear();
            return self.error(reply, out, context);
        }
        if receiver.exceeded() {
            // RFC 3030 §2: a failed chunk ends the transaction.
            return self.fail_message(replies::MESSAGE_TOO_BIG, out, context);
        }
        if last {
            receiver.finish(&mut self.body);
            self.phase = Phase::MessageReady;
        } else {
            if let Some(transaction) = self.transaction.as_mut() {
                transaction.bdat = Some(receiver);
            }
            Reply::owned(
                250,
                Some(EnhancedCode::new(2, 0, 0)),
                format!("{chunk_size_bytes} octets received"),
            )
            .write_to(out);
        }
    }

    /// The message ready to spool. `None` unless [`Event::MessageReady`] was returned.
    pub fn message(&self) -> Option<MessageParts<'_>> {
        if !matches!(self.phase, Phase::MessageReady) {
            return None;
        }
        let transaction = self.transaction.as_ref()?;
        Some(MessageParts {
            helo: self.helo.as_ref().map_or("", |helo| helo.name.as_str()),
            mail_from: &transaction.mail_from,
            mail_parameters: &transaction.parameters,
            recipients: &transaction.recipients,
            body: &self.body,
        })
    }

    /// The loop appended the message to the spool; the session now waits for its commit.
    pub fn spooled(&mut self) {
        if matches!(self.phase, Phase::MessageReady) {
            self.phase = Phase::AwaitingCommit;
        }
    }

    /// The message's commit returned: it is durable. Replies 250 with its id.
    pub fn committed(&mut self, id: &str, out: &mut Vec<u8>) {
        Reply::owned(
            250,
            Some(EnhancedCode::new(2, 0, 0)),
            format!("Ok: queued as {id}"),
        )
        .write_to(out);
        self.finish_message();
    }

    /// The message could not be spooled or its commit failed: a temporary failure.
    pub fn refuse_message(
        &mut self,
        reply: Reply,
        out: &mut Vec<u8>,
        context: &SessionContext<'_>,
    ) {
        self.fail_message(reply, out, context);
    }

    /// Writes a 421 and ends the session (timeouts, shutdown).
    pub fn close_with(&mut self, reply: Reply, out: &mut Vec<u8>) {
        reply.write_to(out);
        self.phase = Phase::Closed;
    }

    fn fail_message(&mut self, reply: Reply, out: &mut Vec<u8>, context: &SessionContext<'_>) {
        self.finish_message();
        self.error(reply, out, context);
    }

    fn finish_message(&mut self) {
        self.reset_transaction();
        self.phase = Phase::Command;
    }

    fn reset_transaction(&mut self) {
        self.transaction = None;
        self.body.clear();
        if self.body.capacity() > BODY_CAPACITY_KEPT_BYTES {
            self.body = Vec::new();
        }
    }

    /// Writes an error reply and counts it; past the limit the session ends with 421.
    fn error(&mut self, reply: Reply, out: &mut Vec<u8>, context: &SessionContext<'_>) {
        reply.write_to(out);
        self.errors = self.errors.saturating_add(1);
        if self.errors >= context.limits.max_errors_per_session
            && !matches!(self.phase, Phase::Closed)
        {
            replies::TOO_MANY_ERRORS.write_to(out);
            self.phase = Phase::Closed;
        }
    }
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

/// The client's EHLO name is echoed in our reply: keep it printable so a client cannot
/// inject reply lines.
fn sanitize_for_reply(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(ECHOED_HELO_CHARS_MAX)
        .collect()
}

/// The longest client name echoed back: a domain is at most 255 octets (RFC 5321
/// §4.5.3.1.2).
const ECHOED_HELO_CHARS_MAX: usize = 255;

/// Why a new connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    TooManyConnections,
    TooManyFromAddress,
}

impl Admission {
    pub fn reply(self) -> Reply {
        match self {
            Admission::TooManyConnections => replies::TOO_MANY_CONNECTIONS,
            Admission::TooManyFromAddress => replies::TOO_MANY_CONNECTIONS_FROM_YOU,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (sender, recipients, content) of a spooled message.
    type Spooled = (String, Vec<String>, Vec<u8>);

    struct Harness {
        session: Session,
        limits: Limits,
        may_relay: bool,
        output: Vec<u8>,
    }

    impl Harness {
        fn new() -> Self {
            Self::with_limits(Limits::default())
        }

        fn with_limits(limits: Limits) -> Self {
            Self {
                session: Session::new(),
                limits,
                may_relay: true,
                output: Vec::new(),
            }
        }

        /// Feeds `input`; when a message is ready, "spools" it and commits it at once.
        /// Returns the replies written and the messages that were spooled.
        fn feed(&mut self, input: &[u8]) -> (String, Vec<Spooled>) {
            let mut spooled = Vec::new();
            let mut offset = 0;
            loop {
                let context = SessionContext {
                    hostname: "relay.test",
                    limits: &self.limits,
                    may_relay: self.may_relay,
                };
                let (used, event) =
                    self.session
                        .process(&input[offset..], &mut self.output, &context);
                offset += used;
                match event {
                    Event::MessageReady => {
                        let parts = self.session.message().expect("message ready");
                        spooled.push((
                            parts.mail_from.to_string(),
                            parts.recipients.to_vec(),
                            parts.body.to_vec(),
                        ));
                        self.session.spooled();
                        self.session.committed("0000000000000001", &mut self.output);
                    }
                    Event::AwaitingCommit => panic!("commit was resolved synchronously"),
                    Event::NeedInput | Event::Close => break,
                }
            }
            let replies = String::from_utf8(std::mem::take(&mut self.output)).unwrap();
            (replies, spooled)
        }
    }

    fn codes(replies: &str) -> Vec<&str> {
        replies
            .lines()
            .filter(|line| line.as_bytes().get(3) == Some(&b' '))
            .map(|line| &line[..3])
            .collect()
    }

    #[test]
    fn pipelined_transaction_replies_in_order() {
        let mut harness = Harness::new();
        let (replies, spooled) = harness.feed(
            b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n",
        );
        assert_eq!(
            codes(&replies),
            ["250", "250", "250", "250", "354", "250", "221"],
            "{replies}"
        );
        assert!(
            replies.contains("250-PIPELINING\r\n") && replies.contains("250-CHUNKING\r\n"),
            "{replies}"
        );
        assert_eq!(spooled.len(), 1);
        assert_eq!(spooled[0].0, "a@example.com");
        assert_eq!(spooled[0].1, ["b@example.org", "c@example.org"]);
        assert_eq!(spooled[0].2, b"Subject: hi\r\n\r\nbody\r\n");
    }

    #[test]
    fn sequence_errors() {
        let cases: &[(&[u8], &[&str])] = &[
            (b"MAIL FROM:<a@b.c>\r\n", &["503"]),
            (b"HELO x\r\nRCPT TO:<a@b.c>\r\n", &["250", "503"]),
            (b"HELO x\r\nDATA\r\n", &["250", "503"]),
            (
                b"HELO x\r\nMAIL FROM:<a@b.c>\r\nDATA\r\n",
                &["250", "250", "554"],
            ),
            (
                b"HELO x\r\nMAIL FROM:<a@b.c>\r\nMAIL FROM:<a@b.c>\r\n",
                &["250", "250", "503"],
            ),
            (
                b"HELO x\r\nMAIL FROM:<a@b.c> BODY=8BITMIME\r\n",
                &["250", "555"],
            ),
            (
                b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRSET\r\nRCPT TO:<d@e.f>\r\n",
                &["250", "250", "250", "503"],
            ),
            (
                b"EHLO x\r\nVRFY root\r\nEXPN list\r\nHELP\r\nNOOP\r\n",
                &["250", "252", "502", "214", "250"],
            ),
            (
                b"EHLO x\r\nAUTH PLAIN\r\nSTARTTLS\r\n",
                &["250", "502", "502"],
            ),
            (
                b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nBDAT 2\r\nabDATA\r\n",
                &["250", "250", "250", "250", "503"],
            ),
            (
                b"EHLO x\r\nMAIL FROM:<j\xc3\xbcrgen@b.c>\r\n",
                &["250", "553"],
            ),
            (
                b"EHLO x\r\nMAIL FROM:<j\xc3\xbcrgen@b.c> SMTPUTF8\r\nRCPT TO:<\xc3\xbc@d.e>\r\n",
                &["250", "250", "250"],
            ),
        ];
        for (input, want) in cases {
            let (replies, spooled) = Harness::new().feed(input);
            assert_eq!(
                codes(&replies),
                *want,
                "{:?}\n{replies}",
                String::from_utf8_lossy(input)
            );
            assert!(spooled.is_empty());
        }
    }

    #[test]
    fn relay_denied_outside_relay_networks() {
        let mut harness = Harness::new();
        harness.may_relay = false;
        let (replies, _) = harness.feed(b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n");
        assert_eq!(codes(&replies), ["250", "250", "550"]);
        assert!(replies.contains("550 5.7.1"), "{replies}");
    }

    #[test]
    fn size_limits() {
        let limits = Limits {
            max_message_size_bytes: 100,
            ..Limits::default()
        };
        let (replies, _) =
            Harness::with_limits(limits.clone()).feed(b"EHLO x\r\nMAIL FROM:<a@b.c> SIZE=101\r\n");
        assert!(
            replies.ends_with("552 5.3.4 Message exceeds fixed maximum message size\r\n"),
            "{replies}"
        );
        assert!(replies.contains("250-SIZE 100\r\n"));

        let mut input = b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 200));
        input.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
        let (replies, spooled) = Harness::with_limits(limits).feed(&input);
        assert_eq!(
            codes(&replies),
            ["250", "250", "250", "354", "552", "250"],
            "{replies}"
        );
        assert!(spooled.is_empty());
    }

    #[test]
    fn recipient_limit_gives_452() {
        let limits = Limits {
            max_recipients: 2,
            ..Limits::default()
        };
        let (replies, _) = Harness::with_limits(limits)
            .feed(b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<1@e.f>\r\nRCPT TO:<2@e.f>\r\nRCPT TO:<3@e.f>\r\n");
        assert_eq!(codes(&replies), ["250", "250", "250", "250", "452"]);
        assert!(replies.contains("452 4.5.3"));
    }

    #[test]
    fn error_and_command_limits_close_the_session() {
        let limits = Limits {
            max_errors_per_session: 3,
            ..Limits::default()
        };
        let (replies, _) =
            Harness::with_limits(limits).feed(b"BOGUS\r\nBOGUS\r\nBOGUS\r\nNOOP\r\n");
        assert_eq!(codes(&replies), ["500", "500", "500", "421"], "{replies}");

        let limits = Limits {
            max_commands_per_session: 2,
            ..Limits::default()
        };
        let (replies, _) = Harness::with_limits(limits).feed(b"NOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\n");
        assert_eq!(codes(&replies), ["250", "250", "421"], "{replies}");
    }

    #[test]
    fn long_command_line_is_skipped_with_500() {
        let limits = Limits {
            max_command_line_bytes: 512,
            ..Limits::default()
        };
        let mut input = b"NOOP ".to_vec();
        input.extend(std::iter::repeat_n(b'a', 2000));
        input.extend_from_slice(b"\r\nNOOP\r\n");
        let (replies, _) = Harness::with_limits(limits).feed(&input);
        assert_eq!(codes(&replies), ["500", "250"], "{replies}");
        assert!(replies.contains("500 5.5.6"));
    }

    #[test]
    fn bdat_chunks_and_refusals() {
        let (replies, spooled) = Harness::new().feed(
            b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nBDAT 6\r\nab\r\ncdBDAT 4 LAST\r\nef\r\nQUIT\r\n",
        );
        assert_eq!(
            codes(&replies),
            ["250", "250", "250", "250", "250", "221"],
            "{replies}"
        );
        assert_eq!(spooled.len(), 1);
        assert_eq!(spooled[0].2, b"ab\r\ncdef\r\n");

        // Without a transaction the chunk is read and discarded, then refused.
        let (replies, spooled) = Harness::new().feed(b"EHLO x\r\nBDAT 5 LAST\r\nhelloNOOP\r\n");
        assert_eq!(codes(&replies), ["250", "503", "250"], "{replies}");
        assert!(spooled.is_empty());
    }

    #[test]
    fn split_input_gives_same_result() {
        let input: &[u8] =
            b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nline\r\n..dot\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<g@h.i>\r\nBDAT 3 LAST\r\nxyzQUIT\r\n";
        let (whole_replies, whole_spooled) = Harness::new().feed(input);
        for split in 1..input.len() {
            let mut harness = Harness::new();
            // The harness leaves unconsumed bytes to the caller, like the event loop does.
            let mut buffered = Vec::new();
            let mut replies = String::new();
            let mut spooled = Vec::new();
            for piece in [&input[..split], &input[split..]] {
                buffered.extend_from_slice(piece);
                let mut offset = 0;
                loop {
                    let context = SessionContext {
                        hostname: "relay.test",
                        limits: &harness.limits,
                        may_relay: true,
                    };
                    let (used, event) =
                        harness
                            .session
                            .process(&buffered[offset..], &mut harness.output, &context);
                    offset += used;
                    if event == Event::MessageReady {
                        let parts = harness.session.message().unwrap();
                        spooled.push((
                            parts.mail_from.to_string(),
                            parts.recipients.to_vec(),
                            parts.body.to_vec(),
                        ));
                        harness.session.spooled();
                        harness
                            .session
                            .committed("0000000000000001", &mut harness.output);
                        continue;
                    }
                    break;
                }
                buffered.drain(..offset);
                replies.push_str(&String::from_utf8(std::mem::take(&mut harness.output)).unwrap());
            }
            assert_eq!(replies, whole_replies, "split at {split}");
            assert_eq!(spooled, whole_spooled, "split at {split}");
        }
        assert_eq!(whole_spooled.len(), 2);
        assert_eq!(whole_spooled[0].2, b"line\r\n.dot\r\n");
        assert_eq!(whole_spooled[1].0, "");
        assert_eq!(whole_spooled[1].2, b"xyz\r\n");
    }

    #[test]
    fn ehlo_name_cannot_inject_reply_lines() {
        assert_eq!(sanitize_for_reply("a\rb\nc"), "a?b?c");
    }
}
