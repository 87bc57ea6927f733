//! The client side of an SMTP session (RFC 5321 §3, §4.1) and one mail transaction at
//! a time, with or without PIPELINING (RFC 2920).
//!
//! A [`Session`] handles the greeting, EHLO (falling back to HELO when EHLO gets a
//! 5xx), STARTTLS (RFC 3207) and QUIT. Once it is ready, [`Session::transaction`] starts a [`Transaction`]
//! for one message; the caller writes what each [`TransactionStep`] says, feeds every
//! reply to [`Transaction::on_reply`], and ends with a [`TransactionResult`]: one
//! outcome per recipient, in the envelope's order.
//!
//! While a transaction runs the session stays `Ready` and must not be used; start the
//! next transaction only after the previous one is `Done` and its result says the
//! connection is still usable.

use std::collections::VecDeque;

use crate::dot_stuff::DotStuffed;
use crate::ehlo::Capabilities;
use crate::reply::Reply;

/// Longest name accepted for EHLO/HELO: a domain is at most 255 octets
/// (RFC 5321 §4.5.3.1.2), an address literal is shorter.
pub const MAX_HELO_NAME_BYTES: usize = 255;

/// Longest address accepted in MAIL or RCPT, brackets excluded: the path limit of
/// RFC 5321 §4.5.3.1.3 (256 octets) minus the two angle brackets.
pub const MAX_ADDRESS_BYTES: usize = 254;

/// What the message body is, as far as the `BODY=` parameter goes (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyType {
    /// Only 7-bit data: no `BODY=` parameter is sent.
    SevenBit,
    /// 8-bit MIME data: `BODY=8BITMIME`, which the upstream must offer.
    EightBitMime,
}

/// One message to send: the envelope and the body, borrowed from the spool.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// The reverse-path without angle brackets; empty for the null sender `<>`.
    pub mail_from: &'a str,
    /// Forward-paths without angle brackets. Must not be empty.
    pub recipients: &'a [String],
    pub body_type: BodyType,
    /// The message needs SMTPUTF8 (RFC 6531) for its headers. Non-ASCII addresses
    /// need it too and request it on their own.
    pub smtputf8: bool,
    /// Header fields sent before `body` (a DKIM signature, List-Unsubscribe), each
    /// ending in CRLF; usually empty.
    pub added_fields: &'a [u8],
    /// The content as stored (CRLF line endings), not dot-stuffed.
    pub body: &'a [u8],
}

/// The command a reply answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Greeting,
    Ehlo,
    Helo,
    /// STARTTLS (RFC 3207).
    StartTls,
    /// The RSET before a message on a reused connection.
    Reset,
    Mail,
    Rcpt,
    Data,
    /// The reply after the end-of-data indicator.
    Content,
}

/// A failure decided here, without asking the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalFailure {
    /// The body is 8-bit MIME and the upstream does not offer 8BITMIME (RFC 6152 §3:
    /// such a body must not be sent to it; downgrading is not done here).
    EightBitMimeNotOffered,
    /// The message needs SMTPUTF8 and the upstream does not offer it (RFC 6531 §3.4).
    SmtpUtf8NotOffered,
    /// The message is larger than the upstream's advertised SIZE (RFC 1870 §6).
    MessageTooLarge {
        message_bytes: u64,
        max_message_bytes: u64,
    },
    /// The reply that should have decided this recipient never came: the transaction
    /// was cut short by an earlier reply (421, a failed RSET).
    NoReply,
    /// The connection failed (closed, reset, timed out, unparsable reply) before the
    /// reply that decides this recipient came. `detail` names the upstream and the
    /// stage, for logs and bounces.
    ConnectionLost { detail: String },
}

/// Why a recipient was not delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The upstream's reply to a command.
    Reply {
        stage: Stage,
        reply: Reply,
    },
    Local(LocalFailure),
}

/// What happened to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientOutcome {
    /// The upstream accepted the message for this recipient (2xx after the content).
    Delivered { reply: Reply },
    /// Try again later (4xx, or a reply that never came).
    Deferred(Reason),
    /// Give up and bounce (5xx, or a local permanent failure).
    Failed(Reason),
}

/// Misuse of the state machine, or a reply that matches no command sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("reply {} received when none was expected", .reply.code)]
    UnexpectedReply { reply: Reply },
    #[error("the session is not ready for a transaction")]
    NotReady,
    #[error("the EHLO name is empty, too long or contains spaces or control characters")]
    InvalidHeloName,
    #[error("an envelope address is too long or contains <, >, spaces or control characters")]
    InvalidAddress,
    #[error("the message has no recipients")]
    NoRecipients,
    #[error("STARTTLS was not offered, or TLS is already on (RFC 3207 §4.2)")]
    StartTlsNotAvailable,
}

/// What the caller does after a session reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// Write these bytes, then wait for the next reply.
    Write(Vec<u8>),
    /// Transactions may start ([`Session::capabilities`] is filled in).
    Ready,
    /// The upstream refused the session; send QUIT ([`Session::quit`]) and close.
    Rejected { stage: Stage, reply: Reply },
    /// The reply to QUIT came; close the connection.
    Closed,
    /// 220 to STARTTLS: do the TLS handshake now, before reading anything more, then
    /// call [`Session::tls_established`].
    StartTls,
    /// STARTTLS got a reply other than 220 (454, 501, ...). The session is still
    /// ready, in plain text (RFC 3207 §4); whether to go on is the caller's call.
    StartTlsRefused { reply: Reply },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionState {
    Greeting,
    Ehlo,
    Helo,
    Ready,
    /// STARTTLS was sent; waiting for its reply.
    StartTls,
    /// 220 to STARTTLS came; the caller is doing the TLS handshake. No reply may
    /// come in this state: one would be plain text injected before TLS.
    TlsHandshake,
    Quitting,
    Closed,
}

/// One connection's session state.
#[derive(Debug)]
pub struct Session {
    /// Invariant: 1..=MAX_HELO_NAME_BYTES printable ASCII bytes without spaces.
    helo_name: String,
    state: SessionState,
    /// What the upstream offered; empty until `Ready`, and empty after HELO.
    capabilities: Capabilities,
    /// Transactions that wrote anything; from the second on, each starts with RSET.
    transactions_started: u64,
    /// STARTTLS succeeded; it may not be sent again (RFC 3207 §4.2).
    tls_started: bool,
}

impl Session {
    /// A session waiting for the upstream's greeting. `helo_name` is our name for
    /// EHLO/HELO (a domain or an address literal).
    pub fn new(helo_name: &str) -> Result<Self, ClientError> {
        let valid = !helo_name.is_empty()
            && helo_name.len() <= MAX_HELO_NAME_BYTES
            && helo_name.bytes().all(|byte| byte.is_ascii_graphic());
        if !valid {
            return Err(ClientError::InvalidHeloName);
        }
        Ok(Self {
            helo_name: helo_name.to_owned(),
            state: SessionState::Greeting,
            capabilities: Capabilities::default(),
            transactions_started: 0,
            tls_started: false,
        })
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    pub fn is_ready(&self) -> bool {
        self.state == SessionState::Ready
    }

    /// The command whose reply the session waits for; `None` when it waits for none
    /// (ready, closed, or during the TLS handshake) or for QUIT's.
    pub fn awaiting_stage(&self) -> Option<Stage> {
        match self.state {
            SessionState::Greeting => Some(Stage::Greeting),
            SessionState::Ehlo => Some(Stage::Ehlo),
            SessionState::Helo => Some(Stage::Helo),
            SessionState::StartTls => Some(Stage::StartTls),
            SessionState::Ready
            | SessionState::TlsHandshake
            | SessionState::Quitting
            | SessionState::Closed => None,
        }
    }

    /// The STARTTLS command (RFC 3207 §4). Only when ready, offered in the EHLO reply,
    /// and not already done: after TLS the server must not offer it again, and the
    /// client must not send it again (§4.2).
    ///
    /// It must be the last command written before its reply (§4: STARTTLS ends a
    /// PIPELINING group); nothing else is sent until the handshake is done.
    pub fn starttls(&mut self) -> Result<Vec<u8>, ClientError> {
        if self.state != SessionState::Ready {
            return Err(ClientError::NotReady);
        }
        if !self.capabilities.starttls || self.tls_started {
            return Err(ClientError::StartTlsNotAvailable);
        }
        self.state = SessionState::StartTls;
        Ok(b"STARTTLS\r\n".to_vec())
    }

    /// The TLS handshake after [`SessionEvent::StartTls`] succeeded: forgets what the
    /// plain-text EHLO said (RFC 3207 §4.2: the client MUST discard any knowledge
    /// obtained from the server before TLS) and returns the EHLO to send over TLS.
    pub fn tls_established(&mut self) -> Result<Vec<u8>, ClientError> {
        if self.state != SessionState::TlsHandshake {
            return Err(ClientError::NotReady);
        }
        self.tls_started = true;
        self.capabilities = Capabilities::default();
        self.state = SessionState::Ehlo;
        Ok(self.command("EHLO"))
    }

    /// Feeds a reply to the greeting, EHLO, HELO or QUIT.
    pub fn on_reply(&mut self, reply: Reply) -> Result<SessionEvent, ClientError> {
        match self.state {
            SessionState::Greeting if reply.is_positive_completion() => {
                self.state = SessionState::Ehlo;
                Ok(SessionEvent::Write(self.command("EHLO")))
            }
            SessionState::Ehlo if reply.is_positive_completion() => {
                self.capabilities = Capabilities::from_ehlo_reply(&reply);
                self.state = SessionState::Ready;
                Ok(SessionEvent::Ready)
            }
            // RFC 5321 §3.2: a server that does not know EHLO answers 5xx ("500
            // command unrecognized", "502"); fall back to HELO. A 4xx is a refusal.
            SessionState::Ehlo if reply.is_permanent() => {
                self.state = SessionState::Helo;
                Ok(SessionEvent::Write(self.command("HELO")))
            }
            SessionState::Helo if reply.is_positive_completion() => {
                self.capabilities = Capabilities::default();
                self.state = SessionState::Ready;
                Ok(SessionEvent::Ready)
            }
            SessionState::StartTls if reply.code == 220 => {
                // Forget the plain-text capabilities now, so nothing learned before
                // TLS can be used even if the caller skips `tls_established`.
                self.capabilities = Capabilities::default();
                self.state = SessionState::TlsHandshake;
                Ok(SessionEvent::StartTls)
            }
            // RFC 5321 §3.8: 421 closes the session whatever the command was.
            SessionState::StartTls if reply.code != 421 => {
                self.state = SessionState::Ready;
                Ok(SessionEvent::StartTlsRefused { reply })
            }
            SessionState::Greeting
            | SessionState::Ehlo
            | SessionState::Helo
            | SessionState::StartTls => {
                let stage = match self.state {
                    SessionState::Greeting => Stage::Greeting,
                    SessionState::Ehlo => Stage::Ehlo,
                    SessionState::Helo => Stage::Helo,
                    _ => Stage::StartTls,
                };
                self.state = SessionState::Closed;
                Ok(SessionEvent::Rejected { stage, reply })
            }
            SessionState::Quitting => {
                self.state = SessionState::Closed;
                Ok(SessionEvent::Closed)
            }
            SessionState::Ready | SessionState::TlsHandshake | SessionState::Closed => {
                Err(ClientError::UnexpectedReply { reply })
            }
        }
    }

    /// The QUIT command (RFC 5321 §4.1.1.10). Allowed at any point, including after a
    /// rejected greeting (RFC 5321 §3.1: the client SHOULD send QUIT after a 554).
    pub fn quit(&mut self) -> Vec<u8> {
        self.state = SessionState::Quitting;
        b"QUIT\r\n".to_vec()
    }

    /// Starts a transaction for `message` and returns its first step.
    ///
    /// A message the upstream cannot take (8BITMIME, SMTPUTF8 missing, too large for
    /// its SIZE) finishes at once with every recipient failed and nothing to write.
    pub fn transaction<'a>(
        &mut self,
        message: Message<'a>,
    ) -> Result<(Transaction<'a>, TransactionStep<'a>), ClientError> {
        if self.state != SessionState::Ready {
            return Err(ClientError::NotReady);
        }
        if message.recipients.is_empty() {
            return Err(ClientError::NoRecipients);
        }
        let addresses_valid = valid_address(message.mail_from, true)
            && message
                .recipients
                .iter()
                .all(|recipient| valid_address(recipient, false));
        if !addresses_valid {
            return Err(ClientError::InvalidAddress);
        }

        let needs_smtputf8 = message.smtputf8
            || !message.mail_from.is_ascii()
            || message
                .recipients
                .iter()
                .any(|recipient| !recipient.is_ascii());
        // RFC 1870 §3: the size counts CRLFs but not dot-stuffing or the terminator.
        let message_bytes =
            u64::try_from(message.added_fields.len() + message.body.len()).unwrap_or(u64::MAX);
        let local_failure =
            if message.body_type == BodyType::EightBitMime && !self.capabilities.eight_bit_mime {
                Some(LocalFailure::EightBitMimeNotOffered)
            } else if needs_smtputf8 && !self.capabilities.smtputf8 {
                Some(LocalFailure::SmtpUtf8NotOffered)
            } else {
                match self.capabilities.max_message_bytes {
                    Some(max_message_bytes) if message_bytes > max_message_bytes => {
                        Some(LocalFailure::MessageTooLarge {
                            message_bytes,
                            max_message_bytes,
                        })
                    }
                    _ => None,
                }
            };

        let mut transaction = Transaction {
            message,
            pipelining: self.capabilities.pipelining,
            unsent: VecDeque::new(),
            awaiting: VecDeque::new(),
            mail_reply: None,
            rcpt_replies: vec![None; message.recipients.len()],
            data_reply: None,
            content_reply: None,
            interruption: None,
            connection_usable: true,
            content_sent: false,
            finished: false,
        };
        if let Some(failure) = local_failure {
            transaction.finished = true;
            let outcomes = message
                .recipients
                .iter()
                .map(|_| RecipientOutcome::Failed(Reason::Local(failure.clone())))
                .collect();
            let result = TransactionResult {
                outcomes,
                connection_usable: true,
                content_sent: false,
            };
            return Ok((transaction, TransactionStep::Done(result)));
        }

        // Between messages on a reused connection the server's state is reset first, so
        // whatever the previous transaction left behind cannot leak into this one.
        if self.transactions_started > 0 {
            transaction
                .unsent
                .push_back((Expected::Reset, b"RSET\r\n".to_vec()));
        }
        self.transactions_started += 1;
        let mut mail = format!("MAIL FROM:<{}>", message.mail_from);
        if self.capabilities.size {
            mail.push_str(&format!(" SIZE={message_bytes}"));
        }
        if message.body_type == BodyType::EightBitMime {
            mail.push_str(" BODY=8BITMIME");
        }
        if needs_smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        mail.push_str("\r\n");
        transaction
            .unsent
            .push_back((Expected::Mail, mail.into_bytes()));
        for (index, recipient) in message.recipients.iter().enumerate() {
            let rcpt = format!("RCPT TO:<{recipient}>\r\n");
            transaction
                .unsent
                .push_back((Expected::Rcpt(index), rcpt.into_bytes()));
        }
        transaction
            .unsent
            .push_back((Expected::Data, b"DATA\r\n".to_vec()));

        let first = if transaction.pipelining {
            // RFC 2920 §3.1: RSET, MAIL, RCPT and DATA may all go in one group; the
            // replies come back in order.
            let mut group = Vec::new();
            while let Some((expected, command)) = transaction.unsent.pop_front() {
                group.extend_from_slice(&command);
                transaction.awaiting.push_back(expected);
            }
            group
        } else {
            transaction.send_next().unwrap_or_default()
        };
        Ok((transaction, TransactionStep::Write(first)))
    }

    fn command(&self, verb: &str) -> Vec<u8> {
        format!("{verb} {}\r\n", self.helo_name).into_bytes()
    }
}

/// An address that can go between angle brackets without breaking the command line:
/// no control characters anywhere, and spaces and angle brackets only inside a quoted
/// local part (RFC 5321 §4.1.2: qtextSMTP includes them, `"john doe"@example.com`).
pub fn valid_address(address: &str, empty_allowed: bool) -> bool {
    if (address.is_empty() && !empty_allowed) || address.len() > MAX_ADDRESS_BYTES {
        return false;
    }
    if address.chars().any(char::is_control) {
        return false;
    }
    let unquoted = match address.strip_prefix('"') {
        Some(quoted) => {
            // Find the closing quote, skipping quoted pairs (`\"`).
            let mut characters = quoted.char_indices();
            let mut end = None;
            while let Some((position, character)) = characters.next() {
                match character {
                    '\\' => {
                        characters.next();
                    }
                    '"' => {
                        end = Some(position);
                        break;
                    }
                    _ => {}
                }
            }
            match end.and_then(|end| quoted.get(end + 1..)) {
                Some(rest) => rest,
                None => return false,
            }
        }
        None => address,
    };
    !unquoted
        .chars()
        .any(|character| matches!(character, ' ' | '<' | '>'))
}

/// What the caller does after a transaction step.
#[derive(Debug, Clone)]
pub enum TransactionStep<'a> {
    /// Write these command bytes, then feed the replies.
    Write(Vec<u8>),
    /// Write the content: every slice in order (e.g. with `write_vectored`).
    WriteContent(DotStuffed<'a>),
    /// Nothing to write; feed the next reply.
    Wait,
    Done(TransactionResult),
}

/// The end of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionResult {
    /// One per recipient, in the envelope's order.
    pub outcomes: Vec<RecipientOutcome>,
    /// False after a 421 or a failed RSET: close the connection instead of reusing it.
    pub connection_usable: bool,
    /// The content went out (after a 354). When false the upstream cannot have
    /// accepted the message, so trying it again at once on another connection cannot
    /// duplicate it (a reused connection found closed at RSET, for one).
    pub content_sent: bool,
}

/// The reply each command written is waiting for, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected {
    Reset,
    Mail,
    Rcpt(usize),
    Data,
    Content,
    /// The lone `.` sent after a 354 that came with no accepted recipient; the outcome
    /// is already decided.
    EmptyContent,
    /// The RSET sent after DATA was refused or no recipient was accepted; the outcome
    /// is already decided.
    Cleanup,
}

impl Expected {
    /// True for the replies that decide no recipient.
    fn is_cleanup(self) -> bool {
        matches!(self, Self::EmptyContent | Self::Cleanup)
    }
}

/// One mail transaction. Replies are recorded as they come; the outcomes are decided
/// once, at the end, from the recorded replies.
#[derive(Debug)]
pub struct Transaction<'a> {
    message: Message<'a>,
    pipelining: bool,
    /// Commands not yet written (only without PIPELINING).
    unsent: VecDeque<(Expected, Vec<u8>)>,
    /// Replies owed for commands written, oldest first.
    awaiting: VecDeque<Expected>,
    mail_reply: Option<Reply>,
    /// Invariant: one entry per recipient.
    rcpt_replies: Vec<Option<Reply>>,
    data_reply: Option<Reply>,
    content_reply: Option<Reply>,
    /// The reply that cut the transaction short (421, failed RSET).
    interruption: Option<Reason>,
    connection_usable: bool,
    /// `WriteContent` was handed out.
    content_sent: bool,
    finished: bool,
}

impl<'a> Transaction<'a> {
    /// Feeds the next reply.
    pub fn on_reply(&mut self, reply: Reply) -> Result<TransactionStep<'a>, ClientError> {
        if self.finished {
            return Err(ClientError::UnexpectedReply { reply });
        }
        let Some(expected) = self.awaiting.pop_front() else {
            return Err(ClientError::UnexpectedReply { reply });
        };
        // RFC 5321 §3.8: 421 means the server is closing the connection, whatever the
        // command was.
        if reply.code == 421 {
            self.connection_usable = false;
            if !expected.is_cleanup() {
                self.interruption = Some(Reason::Reply {
                    stage: stage_of(expected),
                    reply: reply.clone(),
                });
                self.record(expected, reply);
            }
            return Ok(self.finish());
        }
        match expected {
            Expected::Reset => {
                if !reply.is_positive_completion() {
                    self.connection_usable = false;
                    self.interruption = Some(Reason::Reply {
                        stage: Stage::Reset,
                        reply,
                    });
                    return Ok(self.finish());
                }
            }
            Expected::Mail => {
                let accepted = reply.is_positive_completion();
                self.mail_reply = Some(reply);
                // Without PIPELINING nothing else was sent; with it, the RCPT and DATA
                // replies still have to be read (they will be 503s).
                if !accepted && !self.pipelining {
                    return Ok(self.finish());
                }
            }
            Expected::Rcpt(_) | Expected::Content => self.record(expected, reply),
            Expected::Data => {
                let go_ahead = reply.code == 354;
                self.data_reply = Some(reply);
                if go_ahead && self.accepted_recipients() > 0 {
                    self.awaiting.push_back(Expected::Content);
                    self.content_sent = true;
                    return Ok(TransactionStep::WriteContent(DotStuffed::with_prefix(
                        self.message.added_fields,
                        self.message.body,
                    )));
                }
                if go_ahead {
                    // RFC 2920 §3.1: if no recipient was accepted but DATA still got
                    // 354, the client "should send a single dot": an empty message the
                    // server has no one to deliver to. Content is never sent.
                    self.awaiting.push_back(Expected::EmptyContent);
                    return Ok(TransactionStep::Write(b".\r\n".to_vec()));
                }
                return Ok(self.after_refused_data());
            }
            Expected::EmptyContent | Expected::Cleanup => {
                if !reply.is_positive_completion() {
                    self.connection_usable = false;
                }
            }
        }
        if let Some(command) = self.send_next() {
            return Ok(TransactionStep::Write(command));
        }
        if self.awaiting.is_empty() {
            return Ok(self.finish());
        }
        Ok(TransactionStep::Wait)
    }

    /// The command whose reply comes next: the oldest one written and not yet
    /// answered. `None` when no reply is owed (the transaction is done, or has
    /// something to write first).
    ///
    /// A driver reads each reply with this stage's timeout, so the replies of a
    /// PIPELINING group each get their own (RFC 5321 §4.5.3.2: MAIL, RCPT and DATA
    /// initiation have different limits), and names it when the reply never comes.
    pub fn awaiting_stage(&self) -> Option<Stage> {
        if self.finished {
            return None;
        }
        self.awaiting.front().copied().map(stage_of)
    }

    /// Ends the transaction because the connection failed: every recipient whose
    /// outcome the replies already received do not decide is deferred with `failure`,
    /// and the connection is marked unusable. Recipients already refused stay refused.
    pub fn abandon(&mut self, failure: LocalFailure) -> TransactionResult {
        self.connection_usable = false;
        self.interruption = Some(Reason::Local(failure));
        self.result()
    }

    fn record(&mut self, expected: Expected, reply: Reply) {
        match expected {
            Expected::Mail => self.mail_reply = Some(reply),
            Expected::Rcpt(index) => {
                if let Some(slot) = self.rcpt_replies.get_mut(index) {
                    *slot = Some(reply);
                }
            }
            Expected::Data => self.data_reply = Some(reply),
            Expected::Content => self.content_reply = Some(reply),
            Expected::Reset | Expected::EmptyContent | Expected::Cleanup => {}
        }
    }

    /// Without PIPELINING: the next command, once every earlier reply is in. DATA is
    /// not sent when no recipient was accepted (RFC 5321 §3.3: it would be refused);
    /// RSET closes the open transaction instead.
    fn send_next(&mut self) -> Option<Vec<u8>> {
        if !self.awaiting.is_empty() {
            return None;
        }
        let (expected, command) = self.unsent.pop_front()?;
        if expected == Expected::Data && self.accepted_recipients() == 0 {
            self.unsent.clear();
            self.awaiting.push_back(Expected::Cleanup);
            return Some(b"RSET\r\n".to_vec());
        }
        self.awaiting.push_back(expected);
        Some(command)
    }

    /// DATA was refused. When MAIL was accepted, the server still holds a transaction:
    /// RFC 2920 §3.1 has the client send RSET (pipelined or not, so the connection is
    /// clean for the next message).
    fn after_refused_data(&mut self) -> TransactionStep<'a> {
        let mail_accepted = self
            .mail_reply
            .as_ref()
            .is_some_and(Reply::is_positive_completion);
        if mail_accepted {
            self.awaiting.push_back(Expected::Cleanup);
            return TransactionStep::Write(b"RSET\r\n".to_vec());
        }
        self.finish()
    }

    fn accepted_recipients(&self) -> usize {
        let mail_accepted = self
            .mail_reply
            .as_ref()
            .is_some_and(Reply::is_positive_completion);
        if !mail_accepted {
            return 0;
        }
        self.rcpt_replies
            .iter()
            .flatten()
            .filter(|reply| reply.is_positive_completion())
            .count()
    }

    fn finish(&mut self) -> TransactionStep<'a> {
        TransactionStep::Done(self.result())
    }

    fn result(&mut self) -> TransactionResult {
        self.finished = true;
        self.unsent.clear();
        self.awaiting.clear();
        let outcomes = self
            .rcpt_replies
            .iter()
            .map(|rcpt_reply| self.outcome(rcpt_reply.as_ref()))
            .collect();
        TransactionResult {
            outcomes,
            connection_usable: self.connection_usable,
            content_sent: self.content_sent,
        }
    }

    /// The first refusal on the recipient's path decides: MAIL (applies to all), its
    /// own RCPT, DATA (applies to all accepted), the content reply (likewise).
    fn outcome(&self, rcpt_reply: Option<&Reply>) -> RecipientOutcome {
        let steps = [
            (Stage::Mail, self.mail_reply.as_ref()),
            (Stage::Rcpt, rcpt_reply),
            (Stage::Data, self.data_reply.as_ref()),
            (Stage::Content, self.content_reply.as_ref()),
        ];
        for (stage, reply) in steps {
            let Some(reply) = reply else {
                let reason = self
                    .interruption
                    .clone()
                    .unwrap_or(Reason::Local(LocalFailure::NoReply));
                return RecipientOutcome::Deferred(reason);
            };
            let accepted = match stage {
                Stage::Data => reply.code == 354,
                _ => reply.is_positive_completion(),
            };
            if !accepted {
                let reason = Reason::Reply {
                    stage,
                    reply: reply.clone(),
                };
                return if reply.is_permanent() {
                    RecipientOutcome::Failed(reason)
                } else {
                    RecipientOutcome::Deferred(reason)
                };
            }
            if stage == Stage::Content {
                return RecipientOutcome::Delivered {
                    reply: reply.clone(),
                };
            }
        }
        // The loop returns on its last step.
        RecipientOutcome::Deferred(Reason::Local(LocalFailure::NoReply))
    }
}

fn stage_of(expected: Expected) -> Stage {
    match expected {
        Expected::Reset | Expected::Cleanup => Stage::Reset,
        Expected::Mail => Stage::Mail,
        Expected::Rcpt(_) => Stage::Rcpt,
        Expected::Data => Stage::Data,
        Expected::Content | Expected::EmptyContent => Stage::Content,
    }
}

#[cfg(test)]
mod tests;
