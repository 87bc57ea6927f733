//! A blocking connection to one upstream: TCP, the session ([`Session`]) and one
//! transaction ([`Transaction`]) after another over it.
//!
//! This is the only module of the crate that does I/O. It writes what the state
//! machines say, reads replies into a bounded buffer and feeds them back; every read
//! and write has a timeout (RFC 5321 §4.5.3.2), so a silent peer costs time, never a
//! hung thread. It blocks: run it on a delivery worker, never on the event loop.
//!
//! TLS is not implemented yet. [`UpstreamConnection::connect_with_tls`] refuses
//! `Implicit` and `Required` (no mail may go out in clear to such an upstream) and
//! treats `Opportunistic` as plain text: STARTTLS is never sent, even when offered.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use tsubame_config::TlsMode;

use crate::client::{
    ClientError, LocalFailure, Message, Session, SessionEvent, Stage, Transaction,
    TransactionResult, TransactionStep,
};
use crate::ehlo::Capabilities;
use crate::reply::{MAX_REPLY_LINE_BYTES, MAX_REPLY_LINES, Reply, ReplyError, parse_reply};

/// RFC 5321 sets no connect timeout; 30 s is Postfix's `smtp_connect_timeout` default,
/// longer than any handshake to a live host takes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// RFC 5321 §4.5.3.2.1, initial 220 message: 5 minutes.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// RFC 5321 §4.5.3.2.2, MAIL command: 5 minutes. Also used for EHLO/HELO, RSET and
/// QUIT, for which the RFC names no value.
pub const MAIL_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// RFC 5321 §4.5.3.2.3, RCPT command: 5 minutes.
pub const RCPT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// RFC 5321 §4.5.3.2.4, DATA initiation (waiting for 354): 2 minutes.
pub const DATA_INITIATION_TIMEOUT: Duration = Duration::from_secs(2 * 60);
/// RFC 5321 §4.5.3.2.5, data block (each write of the content): 3 minutes.
pub const DATA_BLOCK_TIMEOUT: Duration = Duration::from_secs(3 * 60);
/// RFC 5321 §4.5.3.2.6, DATA termination (the reply after `.`): 10 minutes.
pub const DATA_TERMINATION_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// Most reply bytes buffered at once: one reply of the largest size the parser accepts
/// ([`MAX_REPLY_LINES`] lines of [`MAX_REPLY_LINE_BYTES`]), so a valid reply always
/// fits and anything longer is an error before the buffer grows further.
pub const REPLY_BUFFER_BYTES_MAX: usize = MAX_REPLY_LINES * MAX_REPLY_LINE_BYTES;

/// Bytes asked of the socket per read.
const READ_CHUNK_BYTES: usize = 4096;

/// Content slices handed to one `write_vectored` call; far below Linux's IOV_MAX
/// (1024), large enough that a body with many dot-stuffed lines needs few calls.
const CONTENT_SLICES_PER_WRITE: usize = 64;

/// How long each wait may take. [`Timeouts::default`] is RFC 5321's; tests pass
/// shorter ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    /// Waiting for the 220 greeting.
    pub greeting: Duration,
    /// The reply to MAIL, and to EHLO/HELO, RSET, QUIT; also a whole PIPELINING
    /// group's replies.
    pub mail: Duration,
    pub rcpt: Duration,
    /// The 354 after DATA.
    pub data_initiation: Duration,
    /// Each write of the content.
    pub data_block: Duration,
    /// The reply after the end-of-data indicator.
    pub data_termination: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: CONNECT_TIMEOUT,
            greeting: GREETING_TIMEOUT,
            mail: MAIL_TIMEOUT,
            rcpt: RCPT_TIMEOUT,
            data_initiation: DATA_INITIATION_TIMEOUT,
            data_block: DATA_BLOCK_TIMEOUT,
            data_termination: DATA_TERMINATION_TIMEOUT,
        }
    }
}

impl Timeouts {
    /// The same timeout for every wait (tests). A zero duration is raised to 1 ms:
    /// the socket API treats zero as "no timeout".
    pub fn uniform(timeout: Duration) -> Self {
        let timeout = timeout.max(Duration::from_millis(1));
        Self {
            connect: timeout,
            greeting: timeout,
            mail: timeout,
            rcpt: timeout,
            data_initiation: timeout,
            data_block: timeout,
            data_termination: timeout,
        }
    }

    fn for_stage(&self, stage: ConnectionStage) -> Duration {
        let timeout = match stage {
            ConnectionStage::Connect => self.connect,
            ConnectionStage::Greeting => self.greeting,
            ConnectionStage::Ehlo
            | ConnectionStage::Helo
            | ConnectionStage::Reset
            | ConnectionStage::Mail
            | ConnectionStage::Quit => self.mail,
            ConnectionStage::Rcpt => self.rcpt,
            ConnectionStage::Data => self.data_initiation,
            ConnectionStage::Content => self.data_termination,
        };
        // Zero would mean "block forever" to `set_read_timeout`.
        timeout.max(Duration::from_millis(1))
    }
}

/// Where on the connection something went wrong: the last command written, or the
/// connect and greeting before any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionStage {
    Connect,
    Greeting,
    Ehlo,
    Helo,
    Reset,
    Mail,
    Rcpt,
    Data,
    /// Writing the content or waiting for the reply after it.
    Content,
    Quit,
}

impl From<Stage> for ConnectionStage {
    fn from(stage: Stage) -> Self {
        match stage {
            Stage::Greeting => Self::Greeting,
            Stage::Ehlo => Self::Ehlo,
            Stage::Helo => Self::Helo,
            Stage::Reset => Self::Reset,
            Stage::Mail => Self::Mail,
            Stage::Rcpt => Self::Rcpt,
            Stage::Data => Self::Data,
            Stage::Content => Self::Content,
        }
    }
}

/// Everything that can go wrong on an upstream connection. Each variant names the
/// upstream and, where there is one, the stage.
///
/// During [`UpstreamConnection::send`] these do not escape as errors once the
/// transaction has started: they become [`LocalFailure::ConnectionLost`] outcomes.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The upstream wants TLS (`implicit` or `required`) and this driver cannot do it
    /// yet; nothing was sent, not even a TCP handshake.
    #[error("TLS not implemented yet: upstream {address} requires TLS mode {mode:?}")]
    TlsNotImplemented { address: SocketAddr, mode: TlsMode },
    /// The TCP connection could not be opened (refused, unreachable, timed out).
    #[error("connecting to {address}: {source}")]
    Connect {
        address: SocketAddr,
        source: io::Error,
    },
    /// Setting socket options failed.
    #[error("configuring the socket to {address}: {source}")]
    Socket {
        address: SocketAddr,
        source: io::Error,
    },
    /// A read or write took longer than its timeout.
    #[error("{address} timed out after {timeout:?} at {stage:?}")]
    TimedOut {
        address: SocketAddr,
        stage: ConnectionStage,
        timeout: Duration,
    },
    /// The upstream closed the connection before the reply came.
    #[error("{address} closed the connection at {stage:?}")]
    Closed {
        address: SocketAddr,
        stage: ConnectionStage,
    },
    /// Any other read or write failure (reset, broken pipe).
    #[error("I/O with {address} at {stage:?}: {source}")]
    Io {
        address: SocketAddr,
        stage: ConnectionStage,
        source: io::Error,
    },
    /// The upstream sent bytes that are not an SMTP reply.
    #[error("invalid reply from {address} at {stage:?}: {source}")]
    InvalidReply {
        address: SocketAddr,
        stage: ConnectionStage,
        source: ReplyError,
    },
    /// The upstream refused the session (greeting, EHLO or HELO not 2xx).
    #[error("{address} refused the session at {stage:?}: {} {}", .reply.code, .reply.text())]
    Rejected {
        address: SocketAddr,
        stage: Stage,
        reply: Reply,
    },
    /// The state machine refused what it was given (an invalid envelope or EHLO name),
    /// or the upstream sent a reply no command asked for.
    #[error("SMTP protocol error with {address}: {source}")]
    Protocol {
        address: SocketAddr,
        source: ClientError,
    },
    /// An earlier failure (or a 421) left the connection unusable; open a new one.
    #[error("the connection to {address} is no longer usable")]
    Unusable { address: SocketAddr },
}

/// One open SMTP session with an upstream, ready for transactions.
#[derive(Debug)]
pub struct UpstreamConnection {
    stream: TcpStream,
    address: SocketAddr,
    session: Session,
    timeouts: Timeouts,
    /// Received bytes not yet parsed into a reply. Invariant: at most
    /// [`REPLY_BUFFER_BYTES_MAX`] bytes.
    buffer: Vec<u8>,
    /// False once a read or write failed, a reply made no sense, or the upstream said
    /// 421: the session state is unknown and nothing more may be sent.
    usable: bool,
    /// The socket's read and write timeouts as last set, so an unchanged timeout
    /// costs no `setsockopt` per command. `None` until first set.
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

impl UpstreamConnection {
    /// Connects in plain text, reads the greeting and says EHLO (HELO when EHLO gets
    /// a 5xx). Same as [`Self::connect_with_tls`] with [`TlsMode::None`].
    pub fn connect(
        address: SocketAddr,
        helo_name: &str,
        timeouts: Timeouts,
    ) -> Result<Self, DeliveryError> {
        Self::connect_with_tls(address, helo_name, TlsMode::None, timeouts)
    }

    /// Connects honouring an upstream's TLS mode, as far as this driver can:
    ///
    /// * `Implicit`, `Required`: [`DeliveryError::TlsNotImplemented`] before any
    ///   connection is made, so nothing is ever sent in clear to such an upstream.
    /// * `Opportunistic`: plain text; STARTTLS is not used yet even when offered
    ///   (allowed by the mode's meaning: TLS when possible, plain text otherwise).
    /// * `None`: plain text.
    pub fn connect_with_tls(
        address: SocketAddr,
        helo_name: &str,
        tls: TlsMode,
        timeouts: Timeouts,
    ) -> Result<Self, DeliveryError> {
        match tls {
            TlsMode::Implicit | TlsMode::Required => {
                return Err(DeliveryError::TlsNotImplemented { address, mode: tls });
            }
            TlsMode::Opportunistic | TlsMode::None => {}
        }
        // Validate the name before opening a socket.
        let session = Session::new(helo_name)
            .map_err(|source| DeliveryError::Protocol { address, source })?;
        let connect_timeout = timeouts.for_stage(ConnectionStage::Connect);
        let stream = TcpStream::connect_timeout(&address, connect_timeout)
            .map_err(|source| DeliveryError::Connect { address, source })?;
        // Commands are small and each waits for its reply: do not let Nagle delay them.
        stream
            .set_nodelay(true)
            .map_err(|source| DeliveryError::Socket { address, source })?;
        let mut connection = Self {
            stream,
            address,
            session,
            timeouts,
            buffer: Vec::new(),
            usable: true,
            read_timeout: None,
            write_timeout: None,
        };
        connection.open_session()?;
        Ok(connection)
    }

    /// The upstream the connection goes to.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// What the upstream offered in its EHLO reply (empty after HELO).
    pub fn capabilities(&self) -> &Capabilities {
        self.session.capabilities()
    }

    /// False once the connection must not be used for another message.
    pub fn is_usable(&self) -> bool {
        self.usable
    }

    fn open_session(&mut self) -> Result<(), DeliveryError> {
        let mut stage = ConnectionStage::Greeting;
        loop {
            let reply = self.read_reply(stage)?;
            let event = self
                .session
                .on_reply(reply)
                .map_err(|source| self.protocol_error(source))?;
            match event {
                SessionEvent::Write(command) => {
                    stage = if command.starts_with(b"HELO") {
                        ConnectionStage::Helo
                    } else {
                        ConnectionStage::Ehlo
                    };
                    self.write_command(&command, stage)?;
                }
                SessionEvent::Ready => return Ok(()),
                SessionEvent::Rejected { stage, reply } => {
                    // RFC 5321 §3.1: send QUIT after a refusal; its fate does not matter.
                    let quit = self.session.quit();
                    let _ = self.write_command(&quit, ConnectionStage::Quit);
                    self.usable = false;
                    return Err(DeliveryError::Rejected {
                        address: self.address,
                        stage,
                        reply,
                    });
                }
                SessionEvent::Closed => {
                    self.usable = false;
                    return Err(DeliveryError::Closed {
                        address: self.address,
                        stage,
                    });
                }
            }
        }
    }

    /// Sends one message and returns one outcome per recipient.
    ///
    /// `Err` only when the message could not be started: the connection was already
    /// unusable, or the envelope is invalid. Once anything was written, a failing
    /// connection (closed, reset, timeout, garbage) ends the transaction with every
    /// undecided recipient deferred ([`LocalFailure::ConnectionLost`]) and the
    /// connection marked unusable.
    pub fn send(&mut self, message: Message<'_>) -> Result<TransactionResult, DeliveryError> {
        if !self.usable {
            return Err(DeliveryError::Unusable {
                address: self.address,
            });
        }
        let (mut transaction, mut step) = self
            .session
            .transaction(message)
            .map_err(|source| self.protocol_error(source))?;
        loop {
            // The stage (and so the timeout) of the next reply is whatever the
            // transaction waits for: in a PIPELINING group, MAIL, each RCPT and DATA
            // in turn, not the group's first command.
            let stage = transaction
                .awaiting_stage()
                .map_or(ConnectionStage::Mail, ConnectionStage::from);
            let written = match step {
                TransactionStep::Done(result) => {
                    if !result.connection_usable {
                        self.usable = false;
                    }
                    return Ok(result);
                }
                TransactionStep::Write(command) => self.write_command(&command, stage),
                TransactionStep::WriteContent(content) => self.write_content(content),
                TransactionStep::Wait => Ok(()),
            };
            if let Err(error) = written {
                return Ok(self.abandon(&mut transaction, &error));
            }
            let reply = match self.read_reply(stage) {
                Ok(reply) => reply,
                Err(error) => return Ok(self.abandon(&mut transaction, &error)),
            };
            step = match transaction.on_reply(reply) {
                Ok(step) => step,
                Err(source) => {
                    let error = self.protocol_error(source);
                    return Ok(self.abandon(&mut transaction, &error));
                }
            };
        }
    }

    /// Says QUIT, waits for the reply, and closes. A connection already unusable is
    /// just closed.
    pub fn quit(mut self) -> Result<(), DeliveryError> {
        if self.usable {
            self.usable = false;
            let quit = self.session.quit();
            self.write_command(&quit, ConnectionStage::Quit)?;
            let reply = self.read_reply(ConnectionStage::Quit)?;
            self.session
                .on_reply(reply)
                .map_err(|source| self.protocol_error(source))?;
        }
        // The peer may already have closed; the socket is dropped either way.
        let _ = self.stream.shutdown(Shutdown::Both);
        Ok(())
    }

    fn abandon(
        &mut self,
        transaction: &mut Transaction<'_>,
        error: &DeliveryError,
    ) -> TransactionResult {
        self.usable = false;
        let _ = self.stream.shutdown(Shutdown::Both);
        transaction.abandon(LocalFailure::ConnectionLost {
            detail: error.to_string(),
        })
    }

    fn protocol_error(&mut self, source: ClientError) -> DeliveryError {
        self.usable = false;
        DeliveryError::Protocol {
            address: self.address,
            source,
        }
    }

    fn write_command(
        &mut self,
        command: &[u8],
        stage: ConnectionStage,
    ) -> Result<(), DeliveryError> {
        let timeout = self.timeouts.for_stage(stage);
        self.set_write_timeout(timeout)?;
        self.stream
            .write_all(command)
            .map_err(|source| self.io_error(stage, timeout, source))
    }

    /// Writes the dot-stuffed content slice by slice as the encoder lends them, in
    /// groups of [`CONTENT_SLICES_PER_WRITE`]: the body is never copied.
    fn write_content<'a>(
        &mut self,
        content: impl Iterator<Item = &'a [u8]>,
    ) -> Result<(), DeliveryError> {
        let stage = ConnectionStage::Content;
        let timeout = self.timeouts.data_block.max(Duration::from_millis(1));
        self.set_write_timeout(timeout)?;
        let mut group: Vec<&[u8]> = Vec::with_capacity(CONTENT_SLICES_PER_WRITE);
        let mut content = content.peekable();
        while content.peek().is_some() {
            group.clear();
            group.extend(
                content
                    .by_ref()
                    .filter(|slice| !slice.is_empty())
                    .take(CONTENT_SLICES_PER_WRITE),
            );
            write_all_vectored(&mut self.stream, &group)
                .map_err(|source| self.io_error(stage, timeout, source))?;
        }
        Ok(())
    }

    fn set_write_timeout(&mut self, timeout: Duration) -> Result<(), DeliveryError> {
        if self.write_timeout == Some(timeout) {
            return Ok(());
        }
        self.stream
            .set_write_timeout(Some(timeout))
            .map_err(|source| DeliveryError::Socket {
                address: self.address,
                source,
            })?;
        self.write_timeout = Some(timeout);
        Ok(())
    }

    fn set_read_timeout(&mut self, timeout: Duration) -> Result<(), DeliveryError> {
        if self.read_timeout == Some(timeout) {
            return Ok(());
        }
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(|source| DeliveryError::Socket {
                address: self.address,
                source,
            })?;
        self.read_timeout = Some(timeout);
        Ok(())
    }

    /// Reads until the buffer holds a whole reply, and returns it.
    fn read_reply(&mut self, stage: ConnectionStage) -> Result<Reply, DeliveryError> {
        let timeout = self.timeouts.for_stage(stage);
        self.set_read_timeout(timeout)?;
        let mut chunk = [0_u8; READ_CHUNK_BYTES];
        loop {
            match parse_reply(&self.buffer) {
                Ok(Some((reply, consumed))) => {
                    self.buffer.drain(..consumed.min(self.buffer.len()));
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(source) => {
                    self.usable = false;
                    return Err(DeliveryError::InvalidReply {
                        address: self.address,
                        stage,
                        source,
                    });
                }
            }
            let space = REPLY_BUFFER_BYTES_MAX.saturating_sub(self.buffer.len());
            if space == 0 {
                // The parser rejects a reply longer than this before it fills the
                // buffer; treat reaching it anyway as a too-long reply.
                self.usable = false;
                return Err(DeliveryError::InvalidReply {
                    address: self.address,
                    stage,
                    source: ReplyError::TooManyLines,
                });
            }
            let want = space.min(chunk.len());
            let read = match self.stream.read(chunk.get_mut(..want).unwrap_or_default()) {
                Ok(0) => {
                    self.usable = false;
                    return Err(DeliveryError::Closed {
                        address: self.address,
                        stage,
                    });
                }
                Ok(read) => read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(self.io_error(stage, timeout, source)),
            };
            self.buffer
                .extend_from_slice(chunk.get(..read).unwrap_or_default());
        }
    }

    fn io_error(
        &mut self,
        stage: ConnectionStage,
        timeout: Duration,
        source: io::Error,
    ) -> DeliveryError {
        self.usable = false;
        let address = self.address;
        match source.kind() {
            // A socket timeout shows as WouldBlock on Unix, TimedOut on Windows.
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => DeliveryError::TimedOut {
                address,
                stage,
                timeout,
            },
            _ => DeliveryError::Io {
                address,
                stage,
                source,
            },
        }
    }
}

/// Writes every slice in order with `write_vectored`, resuming after short writes.
fn write_all_vectored(stream: &mut impl Write, slices: &[&[u8]]) -> io::Result<()> {
    let mut io_slices: Vec<IoSlice<'_>> = slices.iter().map(|slice| IoSlice::new(slice)).collect();
    let mut remaining: &mut [IoSlice<'_>] = &mut io_slices;
    while !remaining.is_empty() {
        match stream.write_vectored(remaining) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            // `write_vectored` never reports more bytes than it was given, which is
            // what `advance_slices` requires.
            Ok(written) => IoSlice::advance_slices(&mut remaining, written),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `limit` bytes per call, to exercise resumption.
    struct Trickle {
        written: Vec<u8>,
        limit: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let take = buf.len().min(self.limit);
            self.written.extend_from_slice(&buf[..take]);
            Ok(take)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn vectored_writes_resume_after_short_writes() {
        for limit in [1, 2, 3, 7, 100] {
            let mut writer = Trickle {
                written: Vec::new(),
                limit,
            };
            let slices: &[&[u8]] = &[b"abc", b"", b".", b"def\r\n", b".\r\n"];
            write_all_vectored(&mut writer, slices).unwrap();
            assert_eq!(writer.written, b"abc.def\r\n.\r\n", "limit {limit}");
        }
    }

    #[test]
    fn uniform_timeouts_are_never_zero() {
        let timeouts = Timeouts::uniform(Duration::ZERO);
        assert!(timeouts.for_stage(ConnectionStage::Content) > Duration::ZERO);
    }
}
