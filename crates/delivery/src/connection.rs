//! A blocking connection to one upstream: TCP, TLS when the upstream's mode asks for
//! it, AUTH when there are credentials, then the session ([`Session`]) and one
//! transaction ([`Transaction`]) after another over it.
//!
//! This is the only module of the crate that does I/O. It writes what the state
//! machines say, reads replies into a bounded buffer and feeds them back; every read
//! and write has a timeout (RFC 5321 §4.5.3.2), so a silent peer costs time, never a
//! hung thread. It blocks: run it on a delivery worker, never on the event loop.
//!
//! [`UpstreamConnection::open`] sets a connection up according to [`TlsMode`]:
//!
//! * `Implicit` (RFC 8314): the TLS handshake right after the TCP connect, then the
//!   greeting and EHLO.
//! * `Required` (RFC 3207): greeting and EHLO in plain text; STARTTLS must be
//!   offered and accepted, or the connection ends with an error (after QUIT) before
//!   anything else is sent. After the handshake, EHLO again: what the plain-text EHLO
//!   said is forgotten (§4.2).
//! * `Opportunistic` (RFC 7435): STARTTLS as for `Required` when offered; plain text
//!   when it is not offered or is refused with a reply. A failed handshake is an
//!   error (the TCP connection is lost by then); the caller may retry in plain text
//!   with `TlsMode::None`, as Postfix does at its `may` level.
//! * `None`: plain text; STARTTLS is never sent.
//!
//! With [`Credentials`], AUTH follows (RFC 4954): for a password PLAIN when offered,
//! else LOGIN; for a bearer token the configured mechanism (XOAUTH2 or OAUTHBEARER),
//! which the upstream must offer. Credentials are only ever sent over TLS; a
//! plain-text session with credentials is an error, and no credential appears in
//! `Debug` output, logs or errors.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, ClientConnection, HandshakeKind, ProtocolVersion, StreamOwned};
use rustls_pki_types::ServerName;
use tsubame_config::TlsMode;

use crate::auth::{AuthError, AuthExchange, AuthStep, BearerMechanism, Secret, SecretBytes};
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
/// RFC 5321 §4.5.3.2.2, MAIL command: 5 minutes. Also used for EHLO/HELO, STARTTLS,
/// AUTH, RSET and QUIT, for which the RFCs name no value.
pub const MAIL_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// RFC 5321 §4.5.3.2.3, RCPT command: 5 minutes.
pub const RCPT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// RFC 5321 §4.5.3.2.4, DATA initiation (waiting for 354): 2 minutes.
pub const DATA_INITIATION_TIMEOUT: Duration = Duration::from_secs(2 * 60);
/// RFC 5321 §4.5.3.2.5, data block (each write of the content): 3 minutes.
pub const DATA_BLOCK_TIMEOUT: Duration = Duration::from_secs(3 * 60);
/// RFC 5321 §4.5.3.2.6, DATA termination (the reply after `.`): 10 minutes.
pub const DATA_TERMINATION_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Each read and write of the TLS handshake. RFC 3207 and RFC 8314 name no value;
/// 5 minutes is Postfix's `smtp_starttls_timeout` default.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

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
    /// The reply to MAIL, and to EHLO/HELO, STARTTLS, AUTH, RSET, QUIT.
    pub mail: Duration,
    pub rcpt: Duration,
    /// The 354 after DATA.
    pub data_initiation: Duration,
    /// Each write of the content.
    pub data_block: Duration,
    /// The reply after the end-of-data indicator.
    pub data_termination: Duration,
    /// Each read and write of the TLS handshake.
    pub tls_handshake: Duration,
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
            tls_handshake: TLS_HANDSHAKE_TIMEOUT,
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
            tls_handshake: timeout,
        }
    }

    fn for_stage(&self, stage: ConnectionStage) -> Duration {
        let timeout = match stage {
            ConnectionStage::Connect => self.connect,
            ConnectionStage::Greeting => self.greeting,
            ConnectionStage::Ehlo
            | ConnectionStage::Helo
            | ConnectionStage::StartTls
            | ConnectionStage::Auth
            | ConnectionStage::Reset
            | ConnectionStage::Mail
            | ConnectionStage::Quit => self.mail,
            ConnectionStage::TlsHandshake => self.tls_handshake,
            ConnectionStage::Rcpt => self.rcpt,
            ConnectionStage::Data => self.data_initiation,
            ConnectionStage::Content => self.data_termination,
        };
        // Zero would mean "block forever" to `set_read_timeout`.
        timeout.max(Duration::from_millis(1))
    }
}

/// Where on the connection something went wrong: the last command written, or the
/// connect, handshake and greeting before any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionStage {
    Connect,
    /// The TLS handshake, implicit or after STARTTLS.
    TlsHandshake,
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    /// AUTH and the exchange after it.
    Auth,
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
            Stage::StartTls => Self::StartTls,
            Stage::Reset => Self::Reset,
            Stage::Mail => Self::Mail,
            Stage::Rcpt => Self::Rcpt,
            Stage::Data => Self::Data,
            Stage::Content => Self::Content,
        }
    }
}

/// What AUTH proves, and with which mechanism. `Debug` shows the username and `***`.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// A username and password: AUTH PLAIN when the upstream offers it, else LOGIN.
    Password { username: String, password: Secret },
    /// An OAuth 2.0 access token (RFC 6750) for `username`, the account's email
    /// address, sent with `mechanism`, which the upstream must offer. The token is
    /// the caller's to obtain and refresh; when the upstream refuses it, the error
    /// says so ([`DeliveryError::is_token_rejected`]).
    Bearer {
        username: String,
        token: Secret,
        mechanism: BearerMechanism,
    },
}

impl Credentials {
    /// The user logged in as (for logs).
    pub fn username(&self) -> &str {
        match self {
            Self::Password { username, .. } | Self::Bearer { username, .. } => username,
        }
    }
}

/// AUTH as far as it can be settled before connecting.
#[derive(Debug)]
enum AuthPlan<'a> {
    /// PLAIN or LOGIN, whichever EHLO offers.
    Password {
        username: &'a str,
        password: &'a Secret,
    },
    /// The mechanism is fixed, so the exchange is built before connecting: a token or
    /// name it cannot carry is refused before any socket is opened.
    Bearer {
        mechanism: BearerMechanism,
        exchange: AuthExchange,
        first: SecretBytes,
    },
}

/// How to open a connection: [`UpstreamConnection::open`]'s settings.
#[derive(Debug, Clone)]
pub struct ConnectOptions<'a> {
    /// Our name for EHLO/HELO.
    pub helo_name: &'a str,
    pub tls: TlsMode,
    /// The name the server's certificate must match, also sent as SNI: the relay's
    /// host name, or the MX host name (not the domain mailed to). An IP address is
    /// allowed (matched against the certificate's IP addresses; no SNI is sent).
    /// Unused for [`TlsMode::None`].
    pub server_name: &'a str,
    /// From [`TlsSettings::config`](crate::TlsSettings::config), built once per upstream. Required for every
    /// mode but [`TlsMode::None`]. Whether the certificate is verified is this
    /// configuration's business: the opportunistic one does not verify.
    pub tls_config: Option<Arc<ClientConfig>>,
    /// AUTH after TLS when given; never sent over plain text.
    pub credentials: Option<&'a Credentials>,
    pub timeouts: Timeouts,
}

/// Everything that can go wrong on an upstream connection. Each variant names the
/// upstream and, where there is one, the stage. None holds a credential.
///
/// During [`UpstreamConnection::send`] these do not escape as errors once the
/// transaction has started: they become [`LocalFailure::ConnectionLost`] outcomes.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// [`ConnectOptions::tls_config`] is missing for a mode that needs TLS; nothing
    /// was sent, not even a TCP handshake.
    #[error("no TLS configuration given for upstream {address} with TLS mode {mode:?}")]
    TlsConfigMissing { address: SocketAddr, mode: TlsMode },
    /// [`ConnectOptions::server_name`] is neither a DNS name nor an IP address;
    /// nothing was sent.
    #[error("invalid TLS server name {server_name:?} for {address}")]
    InvalidServerName {
        address: SocketAddr,
        server_name: String,
    },
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
    /// The TLS handshake failed: the certificate did not verify (unknown issuer,
    /// wrong name, expired), no common version or cipher suite, an alert from the
    /// server, or a server that does not speak TLS. A timeout or a closed connection
    /// during the handshake is [`Self::TimedOut`] or [`Self::Closed`] at
    /// [`ConnectionStage::TlsHandshake`].
    #[error("TLS handshake with {address} ({server_name}) failed: {reason}")]
    TlsHandshake {
        address: SocketAddr,
        server_name: String,
        reason: String,
    },
    /// `Required`, and the EHLO reply does not offer STARTTLS. QUIT was sent, nothing
    /// else.
    #[error("{address} does not offer STARTTLS, and TLS is required")]
    StartTlsNotOffered { address: SocketAddr },
    /// `Required`, and STARTTLS got a reply other than 220. QUIT was sent, nothing
    /// else.
    #[error("{address} refused STARTTLS: {} {}", .reply.code, .reply.text())]
    StartTlsRefused { address: SocketAddr, reply: Reply },
    /// Bytes came after the 220 to STARTTLS, before the handshake: a server must
    /// wait for the handshake, so they were injected by someone on the path (the
    /// CVE-2011-0411 class of attacks, RFC 3207 §6). They are dropped unread and the
    /// connection closed.
    #[error("{address} sent {bytes} bytes in plain text after accepting STARTTLS")]
    PlaintextAfterStartTls { address: SocketAddr, bytes: usize },
    /// Credentials were given but the session is not encrypted (`None` mode, or an
    /// opportunistic upstream without STARTTLS): they are never sent in clear.
    #[error("not sending credentials to {address} over an unencrypted connection")]
    AuthWithoutTls { address: SocketAddr },
    /// Password credentials, and the upstream offers neither AUTH PLAIN nor AUTH
    /// LOGIN.
    #[error(
        "{address} offers no AUTH mechanism this client supports (PLAIN, LOGIN); offered: {}",
        if .offered.is_empty() { "none".to_owned() } else { .offered.join(" ") }
    )]
    AuthMechanismUnsupported {
        address: SocketAddr,
        offered: Vec<String>,
    },
    /// Bearer credentials, and the upstream does not offer their mechanism. QUIT was
    /// sent, nothing else.
    #[error(
        "{address} does not offer AUTH {mechanism}; offered: {}",
        if .offered.is_empty() { "none".to_owned() } else { .offered.join(" ") }
    )]
    AuthMechanismNotOffered {
        address: SocketAddr,
        mechanism: BearerMechanism,
        offered: Vec<String>,
    },
    /// AUTH failed: [`AuthError::Rejected`] carries the reply (535 bad credentials,
    /// 454 temporary failure, ...), [`AuthError::TokenRejected`] says a bearer token
    /// was refused; neither holds the credentials.
    #[error("AUTH with {address}: {source}")]
    Auth {
        address: SocketAddr,
        source: AuthError,
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
    /// Any other read or write failure (reset, broken pipe, a corrupt TLS record).
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
    /// The upstream refused the session (greeting, EHLO or HELO not 2xx, or 421 to
    /// STARTTLS).
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

impl DeliveryError {
    /// True when retrying can never help, so the message should bounce now.
    ///
    /// Only errors about the message itself are permanent: an envelope the state
    /// machine refuses ([`ClientError::InvalidAddress`], [`ClientError::NoRecipients`])
    /// fails the same way on every attempt.
    ///
    /// Everything about reaching the upstream is temporary: connecting, TLS,
    /// STARTTLS, AUTH, a lost or garbled connection, a refused session. Each is either
    /// the network or the upstream having a bad moment, or configuration an operator
    /// can fix (a CA file, a password, a TLS mode); bouncing mail for a fixable fault
    /// would lose it, so it waits in the queue instead. Postfix likewise defers on
    /// TLS and SASL failures. A 5xx greeting or EHLO ([`Self::Rejected`]) carries its
    /// reply: whether that refusal is final (the only MX host says 554) or one MX of
    /// several is the caller's decision, which needs more than one connection's view.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::Protocol {
                source: ClientError::InvalidAddress | ClientError::NoRecipients,
                ..
            }
        )
    }

    /// True when the upstream refused a bearer token ([`AuthError::TokenRejected`]):
    /// the token has expired or was revoked, so the caller should drop it, fetch a
    /// fresh one and open a new connection with it, once. Any other AUTH failure
    /// (and a second refusal of a fresh token) waits in the queue like the rest.
    pub fn is_token_rejected(&self) -> bool {
        matches!(
            self,
            Self::Auth {
                source: AuthError::TokenRejected { .. },
                ..
            }
        )
    }

    /// The upstream's reply that ended the session, when there was one: a refused
    /// greeting, EHLO or STARTTLS, or an AUTH refusal. For
    /// [`reply_class::classify_reply`](crate::reply_class::classify_reply), which tells
    /// a rate limit (`421 4.7.0 Try again later`, `454 4.7.0 Too many login attempts`)
    /// from other refusals.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            Self::Rejected { reply, .. } | Self::StartTlsRefused { reply, .. } => Some(reply),
            Self::Auth {
                source: AuthError::Rejected(reply) | AuthError::Unexpected(reply),
                ..
            } => Some(reply),
            _ => None,
        }
    }
}

/// The TLS to start on a connection: checked before any socket is opened.
#[derive(Debug)]
struct TlsTarget {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    /// As given, for error messages.
    server_name_text: String,
}

/// The byte stream under the SMTP session.
#[derive(Debug)]
enum Transport {
    Plain(TcpStream),
    /// Boxed: the rustls state is large and moves when STARTTLS upgrades the stream.
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Transport {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(tcp) => tcp,
            Self::Tls(stream) => stream.get_ref(),
        }
    }
}

impl Read for Transport {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(tcp) => tcp.read(buffer),
            Self::Tls(stream) => stream.read(buffer),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(tcp) => tcp.write(bytes),
            Self::Tls(stream) => stream.write(bytes),
        }
    }

    fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Plain(tcp) => tcp.write_vectored(slices),
            Self::Tls(stream) => stream.write_vectored(slices),
        }
    }

    /// For TLS, pushes every record rustls still holds to the socket: a TLS `write`
    /// may leave some buffered and swallow the socket's error until the next call.
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(tcp) => tcp.flush(),
            Self::Tls(stream) => stream.flush(),
        }
    }
}

/// The socket, plain or TLS, with its reply buffer and timeouts.
#[derive(Debug)]
struct Wire {
    transport: Transport,
    address: SocketAddr,
    timeouts: Timeouts,
    /// Received bytes not yet parsed into a reply. Invariant: at most
    /// [`REPLY_BUFFER_BYTES_MAX`] bytes, and empty when TLS starts.
    buffer: Vec<u8>,
    /// The socket's read and write timeouts as last set, so an unchanged timeout
    /// costs no `setsockopt` per command. `None` until first set.
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

impl Wire {
    fn new(tcp: TcpStream, address: SocketAddr, timeouts: Timeouts) -> Self {
        Self {
            transport: Transport::Plain(tcp),
            address,
            timeouts,
            buffer: Vec::new(),
            read_timeout: None,
            write_timeout: None,
        }
    }

    fn is_encrypted(&self) -> bool {
        matches!(self.transport, Transport::Tls(_))
    }

    /// "TLSv1.3 TLS13_AES_256_GCM_SHA384", for logs; `None` in plain text.
    fn tls_summary(&self) -> Option<String> {
        let Transport::Tls(stream) = &self.transport else {
            return None;
        };
        let version = match stream.conn.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
            Some(ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
            Some(other) => format!("{other:?}"),
            None => "TLS".to_owned(),
        };
        let suite = stream
            .conn
            .negotiated_cipher_suite()
            .map(|suite| {
                let suite = suite.suite();
                suite
                    .as_str()
                    .map_or_else(|| format!("{suite:?}"), str::to_owned)
            })
            .unwrap_or_default();
        Some(format!("{version} {suite}").trim_end().to_owned())
    }

    /// Whether the TLS handshake resumed an earlier session instead of doing a full
    /// one; false in plain text.
    fn tls_resumed(&self) -> bool {
        let Transport::Tls(stream) = &self.transport else {
            return false;
        };
        stream.conn.handshake_kind() == Some(HandshakeKind::Resumed)
    }

    /// Starts TLS on the plain socket: the handshake, with its own timeout.
    ///
    /// RFC 3207 §5-6 and CVE-2011-0411: anything received in plain text after the
    /// 220 to STARTTLS may have been injected by a man in the middle, to be taken for
    /// replies sent over TLS. It is neither parsed as SMTP nor handed to rustls: the
    /// connection ends with [`DeliveryError::PlaintextAfterStartTls`].
    fn start_tls(mut self, target: TlsTarget) -> Result<Self, DeliveryError> {
        let address = self.address;
        if !self.buffer.is_empty() {
            return Err(DeliveryError::PlaintextAfterStartTls {
                address,
                bytes: self.buffer.len(),
            });
        }
        let stage = ConnectionStage::TlsHandshake;
        let timeout = self.timeouts.for_stage(stage);
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)?;
        let handshake_failed = |reason: String| DeliveryError::TlsHandshake {
            address,
            server_name: target.server_name_text.clone(),
            reason,
        };
        let mut tcp = match self.transport {
            Transport::Plain(tcp) => tcp,
            // Unreachable by construction: `open` starts TLS once, on the fresh
            // plain socket (implicit) or after the session's single STARTTLS.
            Transport::Tls(_) => return Err(handshake_failed("TLS is already on".to_owned())),
        };
        let mut tls = ClientConnection::new(target.config, target.server_name)
            .map_err(|error| handshake_failed(error.to_string()))?;
        while tls.is_handshaking() {
            match tls.complete_io(&mut tcp) {
                // No progress and no error: the peer is gone.
                Ok((0, 0)) => return Err(DeliveryError::Closed { address, stage }),
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                // rustls reports its own errors (certificate, alert, not TLS at all)
                // as InvalidData wrapping a `rustls::Error`.
                Err(error) if error.kind() == io::ErrorKind::InvalidData => {
                    return Err(handshake_failed(error.to_string()));
                }
                Err(error) => return Err(io_error(address, stage, timeout, error)),
            }
        }
        Ok(Self {
            transport: Transport::Tls(Box::new(StreamOwned::new(tls, tcp))),
            ..self
        })
    }

    fn set_write_timeout(&mut self, timeout: Duration) -> Result<(), DeliveryError> {
        if self.write_timeout == Some(timeout) {
            return Ok(());
        }
        self.transport
            .tcp()
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
        self.transport
            .tcp()
            .set_read_timeout(Some(timeout))
            .map_err(|source| DeliveryError::Socket {
                address: self.address,
                source,
            })?;
        self.read_timeout = Some(timeout);
        Ok(())
    }

    fn write_command(
        &mut self,
        command: &[u8],
        stage: ConnectionStage,
    ) -> Result<(), DeliveryError> {
        let timeout = self.timeouts.for_stage(stage);
        self.set_write_timeout(timeout)?;
        let written = self
            .transport
            .write_all(command)
            .and_then(|()| self.transport.flush());
        written.map_err(|source| io_error(self.address, stage, timeout, source))
    }

    /// Writes the dot-stuffed content slice by slice as the encoder lends them, in
    /// groups of [`CONTENT_SLICES_PER_WRITE`]: the body is never copied (over TLS,
    /// rustls encrypts each group straight from the slices).
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
            write_all_vectored(&mut self.transport, &group)
                .map_err(|source| io_error(self.address, stage, timeout, source))?;
        }
        self.transport
            .flush()
            .map_err(|source| io_error(self.address, stage, timeout, source))
    }

    /// Reads until the buffer holds a whole reply, and returns it.
    fn read_reply(&mut self, stage: ConnectionStage) -> Result<Reply, DeliveryError> {
        let address = self.address;
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
                    return Err(DeliveryError::InvalidReply {
                        address,
                        stage,
                        source,
                    });
                }
            }
            let space = REPLY_BUFFER_BYTES_MAX.saturating_sub(self.buffer.len());
            if space == 0 {
                // The parser rejects a reply longer than this before it fills the
                // buffer; treat reaching it anyway as a too-long reply.
                return Err(DeliveryError::InvalidReply {
                    address,
                    stage,
                    source: ReplyError::TooManyLines,
                });
            }
            let want = space.min(chunk.len());
            let read = match self
                .transport
                .read(chunk.get_mut(..want).unwrap_or_default())
            {
                Ok(0) => return Err(DeliveryError::Closed { address, stage }),
                Ok(read) => read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(io_error(address, stage, timeout, source)),
            };
            self.buffer
                .extend_from_slice(chunk.get(..read).unwrap_or_default());
        }
    }

    /// Ends the connection: a TLS close_notify when encrypted (best effort), then
    /// both directions of the socket. The peer may already be gone.
    fn close(&mut self) {
        if let Transport::Tls(stream) = &mut self.transport {
            stream.conn.send_close_notify();
            let _ = stream.flush();
        }
        let _ = self.transport.tcp().shutdown(Shutdown::Both);
    }
}

fn io_error(
    address: SocketAddr,
    stage: ConnectionStage,
    timeout: Duration,
    source: io::Error,
) -> DeliveryError {
    match source.kind() {
        // A socket timeout shows as WouldBlock on Unix, TimedOut on Windows.
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => DeliveryError::TimedOut {
            address,
            stage,
            timeout,
        },
        // rustls: the TCP connection ended without a TLS close_notify.
        io::ErrorKind::UnexpectedEof => DeliveryError::Closed { address, stage },
        _ => DeliveryError::Io {
            address,
            stage,
            source,
        },
    }
}

/// How [`UpstreamConnection::run_session`] ended, short of an error.
enum SessionOutcome {
    Ready,
    /// 220 to STARTTLS: the handshake is next.
    StartTls,
    /// STARTTLS got another reply; the session goes on in plain text.
    StartTlsRefused(Reply),
}

/// One open SMTP session with an upstream, ready for transactions.
#[derive(Debug)]
pub struct UpstreamConnection {
    wire: Wire,
    session: Session,
    /// False once a read or write failed, a reply made no sense, or the upstream said
    /// 421: the session state is unknown and nothing more may be sent.
    usable: bool,
}

impl UpstreamConnection {
    /// Connects in plain text, reads the greeting and says EHLO (HELO when EHLO gets
    /// a 5xx). Same as [`Self::open`] with [`TlsMode::None`] and no credentials.
    pub fn connect(
        address: SocketAddr,
        helo_name: &str,
        timeouts: Timeouts,
    ) -> Result<Self, DeliveryError> {
        Self::open(
            address,
            &ConnectOptions {
                helo_name,
                tls: TlsMode::None,
                server_name: "",
                tls_config: None,
                credentials: None,
                timeouts,
            },
        )
    }

    /// Opens a session ready for transactions: TCP connect, TLS as
    /// [`ConnectOptions::tls`] asks (see the module documentation), greeting, EHLO
    /// (HELO when EHLO gets a 5xx; again after STARTTLS), then AUTH when there are
    /// credentials.
    ///
    /// Options that cannot work (an invalid EHLO or server name, no TLS configuration
    /// for a TLS mode, credentials with [`TlsMode::None`], a bearer token or username
    /// its mechanism cannot carry) are refused before any connection is made. Once
    /// connected, every failure closes the connection, after a QUIT when the session
    /// is still in step.
    pub fn open(address: SocketAddr, options: &ConnectOptions<'_>) -> Result<Self, DeliveryError> {
        // Validate everything before opening a socket.
        let session = Session::new(options.helo_name)
            .map_err(|source| DeliveryError::Protocol { address, source })?;
        let target = match options.tls {
            TlsMode::None => None,
            mode => {
                let config = options
                    .tls_config
                    .clone()
                    .ok_or(DeliveryError::TlsConfigMissing { address, mode })?;
                let server_name_text = options.server_name.to_owned();
                let server_name = ServerName::try_from(server_name_text.clone()).map_err(|_| {
                    DeliveryError::InvalidServerName {
                        address,
                        server_name: server_name_text.clone(),
                    }
                })?;
                Some(TlsTarget {
                    config,
                    server_name,
                    server_name_text,
                })
            }
        };
        if options.credentials.is_some() && target.is_none() {
            return Err(DeliveryError::AuthWithoutTls { address });
        }
        let auth_plan = match options.credentials {
            None => None,
            Some(Credentials::Password { username, password }) => {
                Some(AuthPlan::Password { username, password })
            }
            Some(Credentials::Bearer {
                username,
                token,
                mechanism,
            }) => {
                let started = match mechanism {
                    BearerMechanism::XOAuth2 => AuthExchange::xoauth2(username, token),
                    // RFC 7628 §3.1: the host name and port the client connected to.
                    BearerMechanism::OAuthBearer => AuthExchange::oauthbearer(
                        username,
                        token,
                        options.server_name,
                        address.port(),
                    ),
                };
                let (exchange, first) =
                    started.map_err(|source| DeliveryError::Auth { address, source })?;
                Some(AuthPlan::Bearer {
                    mechanism: *mechanism,
                    exchange,
                    first,
                })
            }
        };

        let timeouts = options.timeouts;
        let tcp =
            TcpStream::connect_timeout(&address, timeouts.for_stage(ConnectionStage::Connect))
                .map_err(|source| DeliveryError::Connect { address, source })?;
        // Commands are small and each waits for its reply: do not let Nagle delay them.
        tcp.set_nodelay(true)
            .map_err(|source| DeliveryError::Socket { address, source })?;
        // Implicit TLS starts before the greeting; STARTTLS after the first EHLO.
        let (implicit_target, starttls_target) = match options.tls {
            TlsMode::Implicit => (target, None),
            TlsMode::Required | TlsMode::Opportunistic | TlsMode::None => (None, target),
        };
        let mut wire = Wire::new(tcp, address, timeouts);
        if let Some(target) = implicit_target {
            wire = wire.start_tls(target)?;
        }

        let mut connection = Self {
            wire,
            session,
            usable: true,
        };
        connection.greet()?;
        if let Some(target) = starttls_target {
            connection = connection.starttls(options.tls, target)?;
        }
        if let Some(summary) = connection.tls_summary() {
            tracing::debug!(%address, tls = %summary, "upstream connection encrypted");
        }
        if let Some(plan) = auth_plan {
            connection.authenticate(plan)?;
        }
        Ok(connection)
    }

    /// The upstream the connection goes to.
    pub fn address(&self) -> SocketAddr {
        self.wire.address
    }

    /// What the upstream offered in its last EHLO reply (the one over TLS after
    /// STARTTLS; empty after HELO).
    pub fn capabilities(&self) -> &Capabilities {
        self.session.capabilities()
    }

    /// The TLS version and cipher suite, e.g. "TLSv1.3 TLS13_AES_256_GCM_SHA384",
    /// for logs and `Received:` lines; `None` when the connection is plain text.
    pub fn tls_summary(&self) -> Option<String> {
        self.wire.tls_summary()
    }

    /// Whether the TLS handshake resumed an earlier session (abbreviated handshake)
    /// rather than doing a full one; false in plain text. Only a shared
    /// configuration whose resumption is enabled can resume.
    pub fn tls_resumed(&self) -> bool {
        self.wire.tls_resumed()
    }

    /// False once the connection must not be used for another message.
    pub fn is_usable(&self) -> bool {
        self.usable
    }

    /// Reads the greeting and runs EHLO (or HELO) to the end.
    fn greet(&mut self) -> Result<(), DeliveryError> {
        match self.run_session()? {
            SessionOutcome::Ready => Ok(()),
            // The session yields STARTTLS outcomes only after `Session::starttls`.
            SessionOutcome::StartTls | SessionOutcome::StartTlsRefused(_) => {
                Err(self.protocol_error(ClientError::NotReady))
            }
        }
    }

    /// STARTTLS when offered (or an error when `Required` and it is not), the
    /// handshake, and EHLO over TLS. Consumes the connection: the socket changes
    /// hands on the way.
    fn starttls(mut self, mode: TlsMode, target: TlsTarget) -> Result<Self, DeliveryError> {
        let address = self.wire.address;
        let required = mode == TlsMode::Required;
        if !self.session.capabilities().starttls {
            if required {
                return Err(self.refuse(DeliveryError::StartTlsNotOffered { address }));
            }
            tracing::info!(%address, "STARTTLS not offered; opportunistic TLS goes on in plain text");
            return Ok(self);
        }
        let command = self
            .session
            .starttls()
            .map_err(|source| self.protocol_error(source))?;
        self.write_command(&command, ConnectionStage::StartTls)?;
        match self.run_session()? {
            SessionOutcome::StartTls => {}
            SessionOutcome::StartTlsRefused(reply) if required => {
                return Err(self.refuse(DeliveryError::StartTlsRefused { address, reply }));
            }
            SessionOutcome::StartTlsRefused(reply) => {
                tracing::info!(
                    %address,
                    code = reply.code,
                    "STARTTLS refused; opportunistic TLS goes on in plain text"
                );
                return Ok(self);
            }
            // The session answers STARTTLS only with the two outcomes above.
            SessionOutcome::Ready => return Err(self.protocol_error(ClientError::NotReady)),
        }
        let Self {
            wire,
            session,
            usable,
        } = self;
        let mut connection = Self {
            wire: wire.start_tls(target)?,
            session,
            usable,
        };
        let ehlo = connection
            .session
            .tls_established()
            .map_err(|source| connection.protocol_error(source))?;
        connection.write_command(&ehlo, ConnectionStage::Ehlo)?;
        connection.greet()?;
        Ok(connection)
    }

    /// AUTH (RFC 4954), over TLS only: for a password PLAIN when offered, else LOGIN;
    /// for a bearer token its mechanism, when offered.
    fn authenticate(&mut self, plan: AuthPlan<'_>) -> Result<(), DeliveryError> {
        let address = self.wire.address;
        if !self.wire.is_encrypted() {
            return Err(self.refuse(DeliveryError::AuthWithoutTls { address }));
        }
        let capabilities = self.session.capabilities();
        let (mut exchange, first) = match plan {
            // PLAIN first: one round trip with RFC 4954's initial response, where
            // LOGIN takes three; both carry the password as it is, which TLS protects.
            AuthPlan::Password { username, password } => {
                let started = if capabilities.offers_auth("PLAIN") {
                    AuthExchange::plain(username, password)
                } else if capabilities.offers_auth("LOGIN") {
                    Ok(AuthExchange::login(username, password.clone()))
                } else {
                    let offered = capabilities.auth_mechanisms.clone();
                    return Err(
                        self.refuse(DeliveryError::AuthMechanismUnsupported { address, offered })
                    );
                };
                started.map_err(|source| self.refuse(DeliveryError::Auth { address, source }))?
            }
            // No fallback to another mechanism: the token is for this one, and a
            // password mechanism has no password to send.
            AuthPlan::Bearer {
                mechanism,
                exchange,
                first,
            } => {
                if !capabilities.offers_auth(mechanism.name()) {
                    let offered = capabilities.auth_mechanisms.clone();
                    return Err(self.refuse(DeliveryError::AuthMechanismNotOffered {
                        address,
                        mechanism,
                        offered,
                    }));
                }
                (exchange, first)
            }
        };
        let mut line = first;
        loop {
            self.write_command(line.expose(), ConnectionStage::Auth)?;
            let reply = self.read_reply(ConnectionStage::Auth)?;
            match exchange.on_reply(reply) {
                Ok(AuthStep::Write(next)) => line = next,
                Ok(AuthStep::Done) => return Ok(()),
                Err(source) => return Err(self.refuse(DeliveryError::Auth { address, source })),
            }
        }
    }

    /// Reads replies and writes what the session says until it is ready, or STARTTLS
    /// was answered; a refusal ends the connection.
    fn run_session(&mut self) -> Result<SessionOutcome, DeliveryError> {
        loop {
            let stage = self
                .session
                .awaiting_stage()
                .map_or(ConnectionStage::Greeting, ConnectionStage::from);
            let reply = self.read_reply(stage)?;
            let event = self
                .session
                .on_reply(reply)
                .map_err(|source| self.protocol_error(source))?;
            match event {
                SessionEvent::Write(command) => {
                    let stage = self
                        .session
                        .awaiting_stage()
                        .map_or(ConnectionStage::Ehlo, ConnectionStage::from);
                    self.write_command(&command, stage)?;
                }
                SessionEvent::Ready => return Ok(SessionOutcome::Ready),
                SessionEvent::StartTls => return Ok(SessionOutcome::StartTls),
                SessionEvent::StartTlsRefused { reply } => {
                    return Ok(SessionOutcome::StartTlsRefused(reply));
                }
                SessionEvent::Rejected { stage, reply } => {
                    let address = self.wire.address;
                    return Err(self.refuse(DeliveryError::Rejected {
                        address,
                        stage,
                        reply,
                    }));
                }
                SessionEvent::Closed => {
                    self.usable = false;
                    return Err(DeliveryError::Closed {
                        address: self.wire.address,
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
                address: self.wire.address,
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
                TransactionStep::WriteContent(content) => {
                    let written = self.wire.write_content(content);
                    self.note_failure(written)
                }
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
        let result = if self.usable {
            self.usable = false;
            self.quit_exchange()
        } else {
            Ok(())
        };
        self.wire.close();
        result
    }

    fn quit_exchange(&mut self) -> Result<(), DeliveryError> {
        let quit = self.session.quit();
        self.write_command(&quit, ConnectionStage::Quit)?;
        let reply = self.read_reply(ConnectionStage::Quit)?;
        self.session
            .on_reply(reply)
            .map_err(|source| self.protocol_error(source))?;
        Ok(())
    }

    fn abandon(
        &mut self,
        transaction: &mut Transaction<'_>,
        error: &DeliveryError,
    ) -> TransactionResult {
        self.usable = false;
        self.wire.close();
        transaction.abandon(LocalFailure::ConnectionLost {
            detail: error.to_string(),
        })
    }

    /// Ends a session that is still in step: QUIT (RFC 5321 §3.1 after a refusal;
    /// its fate does not matter), then close. Returns `error` for `?`.
    fn refuse(&mut self, error: DeliveryError) -> DeliveryError {
        if self.usable {
            let quit = self.session.quit();
            let _ = self.wire.write_command(&quit, ConnectionStage::Quit);
        }
        self.usable = false;
        self.wire.close();
        error
    }

    fn protocol_error(&mut self, source: ClientError) -> DeliveryError {
        self.usable = false;
        DeliveryError::Protocol {
            address: self.wire.address,
            source,
        }
    }

    /// Any failed read or write leaves the session state unknown.
    fn note_failure<T>(&mut self, result: Result<T, DeliveryError>) -> Result<T, DeliveryError> {
        if result.is_err() {
            self.usable = false;
        }
        result
    }

    fn write_command(
        &mut self,
        command: &[u8],
        stage: ConnectionStage,
    ) -> Result<(), DeliveryError> {
        let written = self.wire.write_command(command, stage);
        self.note_failure(written)
    }

    fn read_reply(&mut self, stage: ConnectionStage) -> Result<Reply, DeliveryError> {
        let reply = self.wire.read_reply(stage);
        self.note_failure(reply)
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
    fn only_an_invalid_envelope_is_permanent() {
        let address = SocketAddr::from(([127, 0, 0, 1], 25));
        let reply = parse_reply(b"554 5.7.1 go away\r\n")
            .ok()
            .flatten()
            .map(|(reply, _)| reply)
            .unwrap();
        let protocol = |source| DeliveryError::Protocol { address, source };
        let cases = [
            (protocol(ClientError::InvalidAddress), true),
            (protocol(ClientError::NoRecipients), true),
            (protocol(ClientError::InvalidHeloName), false),
            (protocol(ClientError::NotReady), false),
            (
                DeliveryError::Rejected {
                    address,
                    stage: Stage::Greeting,
                    reply: reply.clone(),
                },
                false,
            ),
            (
                DeliveryError::Auth {
                    address,
                    source: AuthError::Rejected(reply.clone()),
                },
                false,
            ),
            (
                DeliveryError::StartTlsRefused {
                    address,
                    reply: reply.clone(),
                },
                false,
            ),
            (DeliveryError::StartTlsNotOffered { address }, false),
            (
                DeliveryError::TlsHandshake {
                    address,
                    server_name: "mx.example".to_owned(),
                    reason: "invalid peer certificate".to_owned(),
                },
                false,
            ),
            (
                DeliveryError::AuthMechanismUnsupported {
                    address,
                    offered: Vec::new(),
                },
                false,
            ),
        ];
        for (error, permanent) in cases {
            assert_eq!(error.is_permanent(), permanent, "{error}");
        }
    }

    #[test]
    fn credentials_debug_hides_the_password_and_the_token() {
        let cases = [
            Credentials::Password {
                username: "user".to_owned(),
                password: Secret::new("hunter2-secret"),
            },
            Credentials::Bearer {
                username: "user".to_owned(),
                token: Secret::new("hunter2-secret"),
                mechanism: BearerMechanism::XOAuth2,
            },
        ];
        for credentials in cases {
            let debug = format!("{credentials:?}");
            assert!(!debug.contains("hunter2"), "{debug}");
            assert!(debug.contains("user"), "{debug}");
            assert_eq!(credentials.username(), "user");
        }
    }

    #[test]
    fn only_a_refused_token_is_token_rejected() {
        let address = SocketAddr::from(([127, 0, 0, 1], 587));
        let reply = |text: &str| {
            parse_reply(text.as_bytes())
                .ok()
                .flatten()
                .map(|(reply, _)| reply)
                .unwrap()
        };
        let auth = |source| DeliveryError::Auth { address, source };
        let cases = [
            (
                auth(AuthError::TokenRejected {
                    reply: reply("535 5.7.8 Username and Password not accepted\r\n"),
                    detail: None,
                }),
                true,
            ),
            (
                auth(AuthError::Rejected(reply("535 5.7.8 bad credentials\r\n"))),
                false,
            ),
            (
                auth(AuthError::Rejected(reply("454 4.7.0 try later\r\n"))),
                false,
            ),
            (
                DeliveryError::AuthMechanismNotOffered {
                    address,
                    mechanism: BearerMechanism::XOAuth2,
                    offered: vec!["PLAIN".to_owned()],
                },
                false,
            ),
            (DeliveryError::AuthWithoutTls { address }, false),
        ];
        for (error, token_rejected) in cases {
            assert_eq!(error.is_token_rejected(), token_rejected, "{error}");
            // Every AUTH failure waits in the queue; none bounces.
            assert!(!error.is_permanent(), "{error}");
        }
    }

    #[test]
    fn uniform_timeouts_are_never_zero() {
        let timeouts = Timeouts::uniform(Duration::ZERO);
        assert!(timeouts.for_stage(ConnectionStage::Content) > Duration::ZERO);
    }
}
