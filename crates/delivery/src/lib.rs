//! The SMTP protocol as seen by a client delivering to an upstream, as functions over
//! bytes.
//!
//! Outside [`connection`] (sockets), [`tls`] (which reads a CA file), [`mx`] (the
//! resolver thread), [`txt`] (its own short-lived runtime) and [`load`] (the bench's worker threads), nothing here opens a
//! socket or file, reads a clock,
//! resolves a name or spawns a thread: the caller writes the bytes that come out and
//! feeds back the replies it reads.
//!
//! * [`reply`]: parses server replies incrementally (multi-line, enhanced codes, limits).
//! * [`ehlo`]: the capabilities an EHLO reply advertises.
//! * [`client`]: the session (greeting, EHLO/HELO, STARTTLS, QUIT) and one mail
//!   transaction at a time (MAIL, RCPT, DATA, with or without PIPELINING), ending in
//!   per-recipient outcomes.
//! * [`dot_stuff`]: the DATA content encoder (dot-stuffing, terminator) over borrowed
//!   slices.
//! * [`auth`]: AUTH client exchanges: PLAIN and LOGIN with a password, XOAUTH2 and
//!   OAUTHBEARER (RFC 7628) with an OAuth 2.0 bearer token.
//! * [`tls`]: rustls client configurations (verifying, or opportunistic per RFC
//!   7435), built once per upstream.
//! * [`connection`]: the one place with network I/O, a blocking driver that connects (plain,
//!   implicit TLS or STARTTLS), authenticates over TLS, and runs the session and
//!   transactions above over the socket, with RFC 5321 timeouts.
//! * [`mx`]: MX lookup (RFC 5321 §5.1), blocking calls served by one resolver thread.
//! * [`txt`]: one blocking TXT lookup for operator commands (`tsubame dkim check`).
//! * [`dsn`]: delivery status notifications (RFC 3464 bounces), pure over bytes.
//! * [`reply_class`]: what a refusal means beyond its code: Google's quota and
//!   rate-limit replies, which defer instead of bouncing.
//! * [`failure_category`]: a failure's kind in plain words (authentication, quota, …),
//!   for the delivery log.
#![forbid(unsafe_code)]

pub mod auth;
pub mod client;
pub mod connection;
pub mod dot_stuff;
pub mod dsn;
pub mod ehlo;
pub mod failure_category;
pub mod load;
pub mod mx;
pub mod reply;
pub mod reply_class;
pub mod tls;
pub mod txt;

pub use auth::{
    AuthError, AuthExchange, AuthStep, BearerErrorDetail, BearerMechanism, EncodingProblem, Secret,
    SecretBytes,
};
pub use client::{
    BodyType, ClientError, LocalFailure, Message, Reason, RecipientOutcome, Session, SessionEvent,
    Stage, Transaction, TransactionResult, TransactionStep,
};
pub use connection::{
    ConnectOptions, ConnectionStage, Credentials, DeliveryError, Timeouts, UpstreamConnection,
};
pub use dot_stuff::DotStuffed;
pub use ehlo::Capabilities;
pub use failure_category::{FailureCategory, failure_category};
pub use reply::{MAX_REPLY_LINE_BYTES, MAX_REPLY_LINES, Reply, ReplyError, parse_reply};
pub use reply_class::{QuotaScope, RateScope, UpstreamSignal, classify, classify_reply};
pub use tls::{TlsError, TlsSettings};
