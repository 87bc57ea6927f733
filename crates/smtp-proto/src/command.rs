//! RFC 5321 command lines, parsed without allocation.

use crate::reply::Reply;

/// One parsed command. Borrowed strings point into the line that was parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    Ehlo {
        domain: &'a str,
    },
    Helo {
        domain: &'a str,
    },
    Mail {
        from: ReversePath<'a>,
        parameters: MailParameters<'a>,
    },
    Rcpt {
        to: Address<'a>,
        parameters: RcptParameters,
    },
    Data,
    /// RFC 3030: `BDAT size [LAST]`.
    Bdat {
        chunk_size_bytes: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy {
        argument: &'a str,
    },
    Expn {
        argument: &'a str,
    },
    Help {
        topic: Option<&'a str>,
    },
    /// RFC 4954: recognised now, behaviour comes with the AUTH issue.
    Auth {
        mechanism: &'a str,
        initial_response: Option<&'a str>,
    },
    StartTls,
}

/// A mailbox as written by the client, angle brackets and any source route removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address<'a> {
    /// `local-part@domain` exactly as the client wrote it (a quoted local part keeps its
    /// quotes), or `postmaster` alone (RFC 5321 §4.1.1.3).
    pub mailbox: &'a str,
    /// The domain (or address literal such as `[192.0.2.1]`); empty for bare `postmaster`.
    pub domain: &'a str,
    /// True when the mailbox holds non-ASCII bytes (needs SMTPUTF8, RFC 6531).
    pub utf8: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReversePath<'a> {
    /// `MAIL FROM:<>`.
    Null,
    Mailbox(Address<'a>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
}

/// ESMTP parameters of MAIL FROM. Unknown parameters are an error (555).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MailParameters<'a> {
    /// RFC 1870 SIZE=.
    pub size_bytes: Option<u64>,
    /// RFC 6152 BODY=.
    pub body: Option<Body>,
    /// RFC 6531 SMTPUTF8.
    pub smtputf8: bool,
    /// RFC 4954 AUTH= (xtext, undecoded).
    pub auth: Option<&'a str>,
}

/// ESMTP parameters of RCPT TO. None are supported yet; unknown ones are an error (555).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RcptParameters {}

/// Why a command line was refused. [`CommandError::reply`] is the one place that turns
/// it into an SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("unrecognised command")]
    UnknownCommand,
    #[error("syntax error: {0}")]
    Syntax(&'static str),
    #[error("bad sender address: {0}")]
    BadSender(&'static str),
    #[error("bad recipient address: {0}")]
    BadRecipient(&'static str),
    #[error("unsupported parameter")]
    UnknownParameter,
    #[error("bad parameter value: {0}")]
    BadParameter(&'static str),
    #[error("command line is not valid UTF-8")]
    NotUtf8,
}

impl CommandError {
    pub fn reply(&self) -> Reply {
        todo!()
    }
}

/// Parses one command line, without its terminator.
pub fn parse_command(line: &[u8]) -> Result<Command<'_>, CommandError> {
    let _ = line;
    todo!()
}
