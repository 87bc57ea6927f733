//! One SMTP session as a state machine over bytes: no sockets, no clock, no spool.
//!
//! The event loop feeds received bytes to [`Session::process`], writes what it puts in
//! the output buffer, and acts on the [`Event`] it returns: when a message is complete it
//! appends it to the spool and later reports the commit with [`Session::committed`] or
//! [`Session::refuse_message`]. While a message waits for its commit the session reads
//! no further commands, so pipelined replies stay in order (RFC 2920 §3.1).

use std::net::SocketAddr;

use tsubame_smtp_proto::command::{Body, Command, MailParameters, ReversePath};
use tsubame_smtp_proto::line::{LineError, next_line, skip_past_line_end};
use tsubame_smtp_proto::reply::{EnhancedCode, Reply};
use tsubame_smtp_proto::sasl::{self, Credentials, Mechanism, ServerExchange, Step};
use tsubame_smtp_proto::{BdatReceiver, BdatStatus, DataOutcome, DataReceiver, DataStatus};

use tsubame_config::{Limits, ListenerConfig, ListenerMode, User, Users};

use crate::conversation::Direction;
use crate::rates::{RatePolicy, Stage};

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
    pub const READY_FOR_TLS: Reply =
        Reply::new(220, EnhancedCode::new(2, 0, 0), "Ready to start TLS");
    pub const TLS_ALREADY_ACTIVE: Reply =
        Reply::new(503, EnhancedCode::new(5, 5, 1), "TLS already active");
    /// RFC 4954 §6.
    pub const AUTH_OK: Reply =
        Reply::new(235, EnhancedCode::new(2, 7, 0), "Authentication succeeded");
    /// RFC 4954 §6; also for an unknown user and a refused authorization identity, so
    /// the reply does not tell a guesser which part was wrong.
    pub const AUTH_INVALID: Reply = Reply::new(
        535,
        EnhancedCode::new(5, 7, 8),
        "Authentication credentials invalid",
    );
    /// RFC 4954 §6.
    pub const ENCRYPTION_REQUIRED: Reply = Reply::new(
        538,
        EnhancedCode::new(5, 7, 11),
        "Encryption required for requested authentication mechanism",
    );
    pub const AUTH_REQUIRED: Reply =
        Reply::new(530, EnhancedCode::new(5, 7, 0), "Authentication required");
    pub const LOCKED_OUT: Reply = Reply::new(
        454,
        EnhancedCode::new(4, 7, 0),
        "Too many failed logins, try again later",
    );
    pub const AUTH_TEMPORARY: Reply = Reply::new(
        454,
        EnhancedCode::new(4, 7, 0),
        "Temporary authentication failure",
    );
    pub const ALREADY_AUTHENTICATED: Reply =
        Reply::new(503, EnhancedCode::new(5, 5, 1), "Already authenticated");
    pub const AUTH_IN_TRANSACTION: Reply = Reply::new(
        503,
        EnhancedCode::new(5, 5, 1),
        "AUTH is not allowed during a mail transaction",
    );
    pub const AUTH_NEEDS_EHLO: Reply =
        Reply::new(503, EnhancedCode::new(5, 5, 1), "Send EHLO before AUTH");
    pub const SENDER_NOT_ALLOWED: Reply = Reply::new(
        550,
        EnhancedCode::new(5, 7, 1),
        "Sender address not allowed for your login",
    );
    pub const RECIPIENT_NOT_ALLOWED: Reply = Reply::new(
        550,
        EnhancedCode::new(5, 7, 1),
        "Recipient domain not allowed for your login",
    );
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
    /// The listener the client connected to: TLS, AUTH policy.
    pub listener: &'a ListenerConfig,
    /// Device accounts; AUTH is offered only when there is one.
    pub users: &'a Users,
    pub rates: &'a RatePolicy,
    /// The time, for the Received header's date and the rate limits.
    pub now_unix_ms: u64,
    /// Put a Received header at the top of each message (not in `tsubame sink`, which
    /// only counts what arrives).
    pub stamp_received: bool,
}

/// The TLS session a client is on, for the Received header and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: &'static str,
    /// The IANA name of the cipher suite, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
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
    /// The 220 to STARTTLS is in the output: discard buffered input, write the output,
    /// start the TLS handshake, then call [`Session::tls_started`].
    StartTls,
    /// The client sent credentials: take them with [`Session::take_credentials`], check
    /// them off the event loop, and report with [`Session::login_succeeded`] or
    /// [`Session::login_failed`].
    Login,
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
    /// In an AUTH exchange, waiting for the client's response line.
    Auth(Box<ServerExchange>),
    /// The exchange produced credentials; the loop takes them.
    LoginReady(Option<Credentials>),
    /// The loop is checking the credentials.
    AwaitingLogin,
    /// The 220 to STARTTLS was written; nothing more is read before the handshake.
    StartingTls,
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

/// One entry of a watched conversation: where the replies stood in the output buffer
/// when it happened, who said it, and the text (redacted).
pub type TranscriptEntry = (usize, Direction, String);

/// One client's SMTP session.
#[derive(Debug)]
pub struct Session {
    phase: Phase,
    client: SocketAddr,
    helo: Option<Helo>,
    transaction: Option<Transaction>,
    tls: Option<TlsInfo>,
    /// The logged-in user's name.
    login: Option<String>,
    /// Kept while someone watches this conversation (`tsubame trace`).
    transcript: Option<Vec<TranscriptEntry>>,
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
    pub fn new(client: SocketAddr) -> Self {
        Self {
            phase: Phase::Command,
            client,
            helo: None,
            transaction: None,
            tls: None,
            login: None,
            transcript: None,
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
            Phase::Command
            | Phase::SkippingLongLine
            | Phase::Auth(_)
            | Phase::LoginReady(_)
            | Phase::AwaitingLogin
            | Phase::StartingTls
            | Phase::Closed => Waiting::Command,
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
                Phase::StartingTls => return (consumed, Event::StartTls),
                Phase::LoginReady(_) => return (consumed, Event::Login),
                Phase::AwaitingLogin => return (consumed, Event::AwaitingCommit),
                Phase::Auth(_) => {
                    let line = match next_line(rest, sasl::MAX_AUTH_LINE_BYTES) {
                        Ok(Some(line)) => line,
                        Ok(None) => return (consumed, Event::NeedInput),
                        Err(LineError::TooLong { .. }) => {
                            self.note_client(out, "***");
                            self.phase = Phase::SkippingLongLine;
                            self.error(sasl::Failure::TooLong.reply(), out, context);
                            continue;
                        }
                    };
                    let text = rest.get(..line.content_bytes).unwrap_or_default();
                    consumed += line.length_bytes;
                    self.note_client(out, if text == b"*" { "*" } else { "***" });
                    let Phase::Auth(mut exchange) =
                        std::mem::replace(&mut self.phase, Phase::Command)
                    else {
                        unreachable!("matched Auth above");
                    };
                    let step = exchange.on_line(text);
                    self.sasl_step(exchange, step, out, context);
                }
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
                            DataOutcome::Complete => self.content_complete(out),
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
                    if self.transcript.is_some() {
                        self.note_client(out, &redact_command(text));
                    }
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
                let Some(transaction) = self.transaction.as_ref() else {
                    return self.error(replies::MAIL_FIRST, out, context);
                };
                if to.utf8 && !transaction.smtputf8 {
                    return self.error(replies::NEEDS_SMTPUTF8, out, context);
                }
                let user = self.user(context);
                if !(context.may_relay || user.is_some()) {
                    return self.error(replies::RELAY_DENIED, out, context);
                }
                if user.is_some_and(|user| !user.recipient_allowed(to.mailbox)) {
                    return self.error(replies::RECIPIENT_NOT_ALLOWED, out, context);
                }
                if transaction.recipients.len() >= context.limits.max_recipients {
                    return self.error(replies::TOO_MANY_RECIPIENTS, out, context);
                }
                let recipients =
                    u32::try_from(transaction.recipients.len() + 1).unwrap_or(u32::MAX);
                if let Err(reply) = context.rates.check(
                    self.client.ip(),
                    self.login.as_deref(),
                    recipients,
                    Stage::Recipient,
                    context.now_unix_ms,
                ) {
                    return self.error(reply, out, context);
                }
                if let Some(transaction) = self.transaction.as_mut() {
                    transaction.recipients.push(to.mailbox.to_string());
                }
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
                    self.start_content(context);
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
            Command::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, initial_response, out, context),
            Command::StartTls => self.start_tls(out, context),
        }
    }

    /// Whether this listener offers STARTTLS to this session now.
    fn offers_starttls(&self, context: &SessionContext<'_>) -> bool {
        context.listener.mode == ListenerMode::Smtp
            && context.listener.has_tls()
            && self.tls.is_none()
    }

    /// Whether AUTH is offered now: there are accounts, and TLS is on or not needed.
    fn offers_auth(&self, context: &SessionContext<'_>) -> bool {
        !context.users.is_empty()
            && (self.tls.is_some() || !context.listener.tls_required_for_auth())
    }

    /// The logged-in user's account.
    fn user<'c>(&self, context: &SessionContext<'c>) -> Option<&'c User> {
        self.login
            .as_deref()
            .and_then(|name| context.users.find(name))
    }

    fn start_tls(&mut self, out: &mut Vec<u8>, context: &SessionContext<'_>) {
        if self.tls.is_some() {
            return self.error(replies::TLS_ALREADY_ACTIVE, out, context);
        }
        if !self.offers_starttls(context) {
            return self.error(replies::TLS_UNAVAILABLE, out, context);
        }
        replies::READY_FOR_TLS.write_to(out);
        self.phase = Phase::StartingTls;
    }

    fn auth(
        &mut self,
        mechanism: &str,
        initial_response: Option<&str>,
        out: &mut Vec<u8>,
        context: &SessionContext<'_>,
    ) {
        if context.users.is_empty() {
            return self.error(replies::AUTH_UNAVAILABLE, out, context);
        }
        let Some(helo) = &self.helo else {
            return self.error(replies::HELO_FIRST, out, context);
        };
        if !helo.extended && !context.listener.allows_auth_after_helo() {
            return self.error(replies::AUTH_NEEDS_EHLO, out, context);
        }
        if self.login.is_some() {
            return self.error(replies::ALREADY_AUTHENTICATED, out, context);
        }
        if self.transaction.is_some() {
            return self.error(replies::AUTH_IN_TRANSACTION, out, context);
        }
        if self.tls.is_none() && context.listener.tls_required_for_auth() {
            return self.error(replies::ENCRYPTION_REQUIRED, out, context);
        }
        let mechanism = match Mechanism::parse(mechanism.as_bytes()) {
            Ok(mechanism) => mechanism,
            Err(unknown) => return self.error(unknown.reply(), out, context),
        };
        let (exchange, step) =
            ServerExchange::start(mechanism, initial_response.map(str::as_bytes));
        self.sasl_step(Box::new(exchange), step, out, context);
    }

    fn sasl_step(
        &mut self,
        exchange: Box<ServerExchange>,
        step: Step,
        out: &mut Vec<u8>,
        context: &SessionContext<'_>,
    ) {
        match step {
            Step::Challenge(challenge) => {
                sasl::write_challenge(challenge, out);
                self.phase = Phase::Auth(exchange);
            }
            Step::Done(credentials) => self.phase = Phase::LoginReady(Some(credentials)),
            Step::Failed(failure) => {
                self.phase = Phase::Command;
                self.error(failure.reply(), out, context);
            }
        }
    }

    /// The credentials to check, once after [`Event::Login`].
    pub fn take_credentials(&mut self) -> Option<Credentials> {
        match &mut self.phase {
            Phase::LoginReady(credentials) => {
                let taken = credentials.take();
                self.phase = Phase::AwaitingLogin;
                taken
            }
            _ => None,
        }
    }

    /// The credentials were right: `235`.
    pub fn login_succeeded(&mut self, name: &str, out: &mut Vec<u8>) {
        if !matches!(self.phase, Phase::AwaitingLogin) {
            return;
        }
        replies::AUTH_OK.write_to(out);
        self.login = Some(name.to_string());
        self.phase = Phase::Command;
    }

    /// The login failed (`535`), was refused (`454`), or could not be checked.
    pub fn login_failed(&mut self, reply: Reply, out: &mut Vec<u8>, context: &SessionContext<'_>) {
        if !matches!(self.phase, Phase::AwaitingLogin) {
            return;
        }
        self.phase = Phase::Command;
        self.error(reply, out, context);
    }

    /// The logged-in user, if any.
    pub fn login(&self) -> Option<&str> {
        self.login.as_deref()
    }

    /// The TLS handshake is about to start after STARTTLS: everything learnt from the
    /// client before it is forgotten (RFC 3207 §4.2), and the client must EHLO again.
    pub fn tls_started(&mut self) {
        self.helo = None;
        self.login = None;
        self.reset_transaction();
        self.phase = Phase::Command;
    }

    /// The TLS handshake completed.
    pub fn tls_established(&mut self, info: TlsInfo) {
        self.tls = Some(info);
    }

    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    /// Starts or stops keeping a transcript for a watcher.
    pub fn set_traced(&mut self, traced: bool) {
        match (traced, self.transcript.is_some()) {
            (true, false) => self.transcript = Some(Vec::new()),
            (false, true) => self.transcript = None,
            _ => {}
        }
    }

    /// The transcript entries since the last call (empty when not traced).
    pub fn take_transcript(&mut self) -> Vec<TranscriptEntry> {
        self.transcript
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn note_client(&mut self, out: &[u8], text: &str) {
        if let Some(transcript) = &mut self.transcript {
            transcript.push((out.len(), Direction::Client, text.to_string()));
        }
    }

    /// The content of the message is complete.
    fn content_complete(&mut self, out: &[u8]) {
        if let Some(transcript) = &mut self.transcript {
            transcript.push((
                out.len(),
                Direction::Note,
                format!("message content: {} bytes", self.body.len()),
            ));
        }
        self.phase = Phase::MessageReady;
    }

    /// A new message's content begins: the body starts with our Received header.
    fn start_content(&mut self, context: &SessionContext<'_>) {
        self.body.clear();
        if !context.stamp_received {
            return;
        }
        crate::received::write_header(
            &crate::received::Trace {
                helo: self.helo.as_ref().map(|helo| helo.name.as_str()),
                extended: self.helo.as_ref().is_some_and(|helo| helo.extended),
                client: self.client.ip(),
                hostname: context.hostname,
                tls: self.tls.as_ref(),
                user: self.login.as_deref(),
                show_user: context.listener.received_header_user,
                smtputf8: self
                    .transaction
                    .as_ref()
                    .is_some_and(|transaction| transaction.smtputf8),
                now_unix_ms: context.now_unix_ms,
            },
            &mut self.body,
        );
    }

    fn ehlo_reply(&self, client_name: &str, context: &SessionContext<'_>) -> Reply {
        let mut text = format!(
            "{} greets {}\nPIPELINING\nSIZE {}\n8BITMIME\nSMTPUTF8\nENHANCEDSTATUSCODES\nCHUNKING",
            context.hostname,
            sanitize_for_reply(client_name),
            context.limits.max_message_size_bytes
        );
        if self.offers_starttls(context) {
            text.push_str("\nSTARTTLS");
        }
        if self.offers_auth(context) {
            text.push_str("\nAUTH PLAIN LOGIN");
        }
        text.push_str("\nHELP");
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
        if context.listener.require_auth && self.login.is_none() {
            return self.error(replies::AUTH_REQUIRED, out, context);
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
        if self
            .user(context)
            .is_some_and(|user| !user.sender_allowed(&mail_from))
        {
            return self.error(replies::SENDER_NOT_ALLOWED, out, context);
        }
        if let Err(reply) = context.rates.check(
            self.client.ip(),
            self.login.as_deref(),
            0,
            Stage::Mail,
            context.now_unix_ms,
        ) {
            return self.error(reply, out, context);
        }
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
                        self.start_content(context);
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
            self.content_complete(out);
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

/// A command line for a transcript: AUTH's initial response is replaced by `***`.
fn redact_command(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let mut words = text.split(' ').filter(|word| !word.is_empty());
    match (words.next(), words.next(), words.next()) {
        (Some(verb), Some(mechanism), Some(_)) if verb.eq_ignore_ascii_case("AUTH") => {
            format!("{verb} {mechanism} ***")
        }
        _ => text.into_owned(),
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
        listener: ListenerConfig,
        users: Users,
        rates: RatePolicy,
        stamp_received: bool,
        tls: bool,
        /// Login checks the harness answers: (name, password) pairs that are right.
        accounts: Vec<(String, String)>,
        output: Vec<u8>,
    }

    impl Harness {
        fn new() -> Self {
            Self::with_limits(Limits::default())
        }

        fn with_limits(limits: Limits) -> Self {
            Self {
                session: Session::new("192.0.2.7:40000".parse().unwrap()),
                limits,
                may_relay: true,
                listener: ListenerConfig::plain("127.0.0.1:2525".parse().unwrap()),
                users: Users::default(),
                rates: RatePolicy::unlimited(),
                stamp_received: false,
                tls: false,
                accounts: Vec::new(),
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
                    listener: &self.listener,
                    users: &self.users,
                    rates: &self.rates,
                    now_unix_ms: 1_234_567_890_000,
                    stamp_received: self.stamp_received,
                };
                let (used, event) =
                    self.session
                        .process(&input[offset..], &mut self.output, &context);
                offset += used;
                match event {
                    Event::StartTls => {
                        assert!(self.tls, "STARTTLS accepted without a certificate");
                        // What the loop does: drop pipelined input, then TLS.
                        offset = input.len();
                        self.session.tls_started();
                        self.session.tls_established(TlsInfo {
                            version: "TLSv1.3",
                            cipher: "TLS13_AES_128_GCM_SHA256".to_string(),
                        });
                    }
                    Event::Login => {
                        let credentials = self.session.take_credentials().unwrap();
                        let right = self.accounts.iter().any(|(name, password)| {
                            *name == credentials.username
                                && password.as_bytes() == credentials.password().expose()
                        }) && credentials.authzid.is_none();
                        if right {
                            self.session
                                .login_succeeded(&credentials.username, &mut self.output);
                        } else {
                            self.session.login_failed(
                                replies::AUTH_INVALID,
                                &mut self.output,
                                &context,
                            );
                        }
                    }
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
                        listener: &harness.listener,
                        users: &harness.users,
                        rates: &harness.rates,
                        now_unix_ms: 0,
                        stamp_received: false,
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

    /// A harness whose listener has a certificate, with one account `scanner` (password
    /// `right`) that may send only as `scans@example.com` to `example.net`.
    fn login_harness() -> Harness {
        let mut harness = Harness::new();
        harness.listener.certificate_file = Some("cert.pem".into());
        harness.listener.key_file = Some("key.pem".into());
        harness.tls = true;
        harness.users = Users::new(vec![User {
            name: "scanner".to_string(),
            password_hash: tsubame_config::users::hash_password(b"unused by the harness").unwrap(),
            allowed_senders: vec![
                tsubame_config::SenderPattern::parse("scans@example.com").unwrap(),
            ],
            allowed_recipient_domains: vec!["example.net".to_string()],
            upstream: None,
        }])
        .unwrap();
        harness.accounts = vec![("scanner".to_string(), "right".to_string())];
        harness
    }

    fn base64(bytes: &[u8]) -> String {
        let mut out = Vec::new();
        tsubame_smtp_proto::sasl::encode_base64(bytes, &mut out);
        String::from_utf8(out).unwrap()
    }

    /// AUTH PLAIN's initial response for `scanner` / `password`.
    fn plain(password: &str) -> String {
        base64(format!("\0scanner\0{password}").as_bytes())
    }

    #[test]
    fn starttls_is_offered_with_a_certificate_and_resets_the_session() {
        let mut harness = login_harness();
        let (replies, _) = harness.feed(b"EHLO x\r\n");
        assert!(replies.contains("250-STARTTLS\r\n"), "{replies}");
        // AUTH needs TLS first: not offered, and refused with 538.
        assert!(!replies.contains("AUTH"), "{replies}");
        let (replies, _) = harness.feed(format!("AUTH PLAIN {}\r\n", plain("right")).as_bytes());
        assert!(replies.starts_with("538 5.7.11 "), "{replies}");

        // Pipelined MAIL after STARTTLS is dropped, and the session starts over.
        let (replies, _) =
            harness.feed(b"MAIL FROM:<a@b.c>\r\nSTARTTLS\r\nMAIL FROM:<evil@x.y>\r\n");
        assert_eq!(codes(&replies), ["250", "220"], "{replies}");
        assert!(
            replies.contains("220 2.0.0 Ready to start TLS"),
            "{replies}"
        );
        let (replies, _) = harness.feed(b"RCPT TO:<d@e.f>\r\nEHLO x\r\n");
        assert_eq!(codes(&replies), ["503", "250"], "{replies}");
        assert!(!replies.contains("STARTTLS"), "{replies}");
        assert!(replies.contains("250-AUTH PLAIN LOGIN\r\n"), "{replies}");
        let (replies, _) = harness.feed(b"STARTTLS\r\n");
        assert!(
            replies.starts_with("503 5.5.1 TLS already active"),
            "{replies}"
        );
    }

    #[test]
    fn starttls_without_a_certificate_is_not_available() {
        let (replies, _) = Harness::new().feed(b"EHLO x\r\nSTARTTLS\r\n");
        assert!(!replies.contains("STARTTLS\r\n"), "{replies}");
        assert!(
            replies.ends_with("502 5.5.1 STARTTLS is not available\r\n"),
            "{replies}"
        );
    }

    #[test]
    fn auth_plain_login_and_their_failures() {
        let mut harness = login_harness();
        harness.feed(b"EHLO x\r\nSTARTTLS\r\n");
        harness.feed(b"EHLO x\r\n");
        let cases: Vec<(String, Vec<&str>)> = vec![
            (format!("AUTH PLAIN {}\r\n", plain("wrong")), vec!["535"]),
            (
                format!("AUTH PLAIN\r\n{}\r\n", plain("wrong")),
                vec!["334", "535"],
            ),
            ("AUTH LOGIN\r\n*\r\n".to_string(), vec!["334", "501"]),
            (
                "AUTH LOGIN\r\nnot base64!\r\n".to_string(),
                vec!["334", "501"],
            ),
            ("AUTH CRAM-MD5\r\n".to_string(), vec!["504"]),
            ("AUTH PLAIN =\r\n".to_string(), vec!["501"]),
        ];
        for (input, want) in cases {
            let (replies, _) = harness.feed(input.as_bytes());
            assert_eq!(codes(&replies), want, "{input:?}: {replies}");
        }
        // LOGIN, in steps: user name, then password.
        let (replies, _) = harness.feed(
            format!(
                "AUTH LOGIN\r\n{}\r\n{}\r\n",
                base64(b"scanner"),
                base64(b"right")
            )
            .as_bytes(),
        );
        assert_eq!(codes(&replies), ["334", "334", "235"], "{replies}");
        assert!(
            replies.contains("235 2.7.0 Authentication succeeded"),
            "{replies}"
        );
        assert_eq!(harness.session.login(), Some("scanner"));
        let (replies, _) = harness.feed(format!("AUTH PLAIN {}\r\n", plain("right")).as_bytes());
        assert!(
            replies.starts_with("503 5.5.1 Already authenticated"),
            "{replies}"
        );
    }

    #[test]
    fn a_login_relays_within_its_restrictions() {
        let mut harness = login_harness();
        harness.may_relay = false;
        harness.feed(b"EHLO x\r\nSTARTTLS\r\n");
        harness.feed(b"EHLO x\r\n");
        // Not logged in and outside relay_networks: no relaying.
        let (replies, _) =
            harness.feed(b"MAIL FROM:<scans@example.com>\r\nRCPT TO:<a@example.net>\r\nRSET\r\n");
        assert_eq!(codes(&replies), ["250", "550", "250"], "{replies}");
        let (replies, _) = harness.feed(format!("AUTH PLAIN {}\r\n", plain("right")).as_bytes());
        assert_eq!(codes(&replies), ["235"], "{replies}");
        let (replies, _) = harness.feed(b"MAIL FROM:<boss@example.com>\r\n");
        assert!(
            replies.starts_with("550 5.7.1 Sender address not allowed"),
            "{replies}"
        );
        let (replies, spooled) = harness.feed(
            b"MAIL FROM:<scans@example.com>\r\nRCPT TO:<a@example.org>\r\nRCPT TO:<a@example.net>\r\nDATA\r\nhi\r\n.\r\n",
        );
        assert_eq!(
            codes(&replies),
            ["250", "550", "250", "354", "250"],
            "{replies}"
        );
        assert!(
            replies.contains("550 5.7.1 Recipient domain not allowed"),
            "{replies}"
        );
        assert_eq!(spooled.len(), 1);
        assert_eq!(spooled[0].1, ["a@example.net"]);
    }

    #[test]
    fn require_auth_refuses_mail_before_login_even_from_relay_networks() {
        let mut harness = login_harness();
        harness.listener.require_auth = true;
        let (replies, _) = harness.feed(b"EHLO x\r\nMAIL FROM:<scans@example.com>\r\n");
        assert!(
            replies.ends_with("530 5.7.0 Authentication required\r\n"),
            "{replies}"
        );
    }

    #[test]
    fn auth_after_helo_and_without_tls_only_when_the_listener_relaxes_it() {
        let mut strict = login_harness();
        strict.listener.certificate_file = None;
        strict.listener.key_file = None;
        let (replies, _) =
            strict.feed(format!("HELO x\r\nAUTH PLAIN {}\r\n", plain("right")).as_bytes());
        assert!(
            replies.ends_with("503 5.5.1 Send EHLO before AUTH\r\n"),
            "{replies}"
        );

        let mut legacy = login_harness();
        legacy.listener.certificate_file = None;
        legacy.listener.key_file = None;
        legacy.listener.profile = Some(tsubame_config::ListenerProfile::LegacyDevice);
        let (replies, _) = legacy.feed(b"EHLO x\r\n");
        assert!(replies.contains("250-AUTH PLAIN LOGIN\r\n"), "{replies}");
        let (replies, _) =
            legacy.feed(format!("HELO x\r\nAUTH PLAIN {}\r\n", plain("right")).as_bytes());
        assert_eq!(codes(&replies), ["250", "235"], "{replies}");
    }

    #[test]
    fn a_foreign_authorization_identity_is_refused_like_a_wrong_password() {
        let mut harness = login_harness();
        harness.feed(b"EHLO x\r\nSTARTTLS\r\n");
        harness.feed(b"EHLO x\r\n");
        let response = base64(b"boss\0scanner\0right");
        let (replies, _) = harness.feed(format!("AUTH PLAIN {response}\r\n").as_bytes());
        assert!(replies.starts_with("535 5.7.8 "), "{replies}");
    }

    #[test]
    fn messages_start_with_a_received_header() {
        let mut harness = login_harness();
        harness.stamp_received = true;
        harness.feed(b"STARTTLS\r\n");
        let (_, spooled) = harness.feed(
            format!(
                "EHLO printer.lan\r\nAUTH PLAIN {}\r\nMAIL FROM:<scans@example.com>\r\nRCPT TO:<a@example.net>\r\nBDAT 4 LAST\r\nhi\r\n",
                plain("right")
            )
            .as_bytes(),
        );
        let body = String::from_utf8(spooled[0].2.clone()).unwrap();
        assert_eq!(
            body,
            "Received: from printer.lan ([192.0.2.7])\r\n\tby relay.test (tsubame) with ESMTPSA\r\n\t(TLSv1.3 TLS13_AES_128_GCM_SHA256);\r\n\tFri, 13 Feb 2009 23:31:30 +0000\r\nhi\r\n"
        );
    }

    #[test]
    fn transcripts_hide_passwords_and_content() {
        let mut harness = login_harness();
        harness.session.set_traced(true);
        harness.feed(b"EHLO x\r\nSTARTTLS\r\nNOOP\r\n");
        harness.feed(
            format!(
                "EHLO x\r\nAUTH PLAIN {}\r\nAUTH LOGIN\r\nc2Nhbm5lcg==\r\ncmlnaHQ=\r\nMAIL FROM:<scans@example.com>\r\nRCPT TO:<a@example.net>\r\nDATA\r\nsecret body\r\n.\r\n",
                plain("wrong")
            )
            .as_bytes(),
        );
        let transcript: Vec<String> = harness
            .session
            .take_transcript()
            .into_iter()
            .map(|(_, direction, text)| format!("{} {text}", direction.marker()))
            .collect();
        assert_eq!(
            transcript,
            [
                "C: EHLO x",
                "C: STARTTLS",
                "C: EHLO x",
                "C: AUTH PLAIN ***",
                "C: AUTH LOGIN",
                "C: ***",
                "C: ***",
                "C: MAIL FROM:<scans@example.com>",
                "C: RCPT TO:<a@example.net>",
                "C: DATA",
                "* message content: 13 bytes",
            ]
        );
    }
}
