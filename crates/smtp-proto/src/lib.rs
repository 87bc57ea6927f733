//! The SMTP protocol as seen by a server, as functions over bytes.
//!
//! Nothing here does I/O, reads a clock or spawns a thread. The event loop in
//! `tsubame-server` feeds bytes in and writes the bytes that come out.
//!
//! * [`line`]: finds the next command line in a buffer (incomplete vs. too long).
//! * [`command`]: parses one command line (RFC 5321 §4.1, ESMTP parameters).
//! * [`reply`]: builds replies with enhanced status codes (RFC 3463).
//! * [`data`]: the DATA receiver (dot-unstuffing, end only at `<CRLF>.<CRLF>`,
//!   line-ending normalisation against SMTP smuggling).
//! * [`bdat`]: the BDAT receiver (RFC 3030 CHUNKING).
//! * [`sasl`]: the server side of AUTH (RFC 4954) with PLAIN (RFC 4616) and LOGIN.
#![forbid(unsafe_code)]

pub mod bdat;
pub mod command;
mod content;
pub mod data;
pub mod date;
pub mod line;
pub mod reply;
pub mod sasl;

pub use bdat::{BdatReceiver, BdatStatus};
pub use command::{
    Address, Body, Command, CommandError, MailParameters, RcptParameters, ReversePath,
    parse_command,
};
pub use data::{DataOutcome, DataReceiver, DataStatus};
pub use line::{Line, LineError, next_line, skip_past_line_end};
pub use reply::{EnhancedCode, Reply};
pub use sasl::{
    Credentials, Failure, Mechanism, Password, ServerExchange, Step, UnknownMechanism,
    write_challenge,
};
