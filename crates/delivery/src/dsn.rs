//! Delivery status notifications ("bounces", RFC 3464) as a pure function over bytes.
//!
//! [`build_dsn`] turns what the queue knows about a message that failed (or is late) into
//! a complete RFC 5322 message with CRLF line endings, a `multipart/report;
//! report-type=delivery-status` (RFC 6522 §2) of three parts:
//!
//! 1. `text/plain`: an explanation for people, naming each recipient and the reason.
//! 2. `message/delivery-status` (RFC 3464 §2): the same facts for programs.
//! 3. `text/rfc822-headers` (RFC 6522 §3): the header section of the original message.
//!    Only the headers, never the body: RFC 6522 §2 lets the third part be the headers
//!    alone, and they are what the sender needs to tell which message failed. Returning
//!    the body would make every bounce as large as the message it reports (up to the
//!    size limit), send attachments back to forged senders (backscatter), and could
//!    itself be refused for size by the sender's server.
//!
//! Nothing here reads a clock, makes an id or touches the network: the caller passes the
//! times and the Message-ID, and sends the result with `MAIL FROM:<>` (RFC 3461 §6,
//! RFC 5321 §4.5.5) to the original envelope sender, unless [`is_bounceable`] says not to.
//!
//! # What comes from outside, and how it is made harmless
//!
//! Upstream replies, host names and addresses end up in header fields and in the
//! delivery-status fields. A reply such as `"550 no\r\nContent-Type: text/html"` must not
//! be able to start a field or a MIME part of its own, so:
//!
//! * Diagnostics, host names and ids: every run of whitespace and control characters
//!   (CR and LF among them) becomes one space, non-ASCII becomes `?`, and diagnostics are
//!   cut at [`DIAGNOSTIC_MAX_BYTES`]. They are ASCII in every report.
//! * Addresses: control characters become `?` (ASCII form), or are written as RFC 6533
//!   `\x{HH}` escapes (UTF-8 form).
//! * Long values are folded at spaces (RFC 5322 §2.2.3) to stay within
//!   [`LINE_PREFERRED_BYTES`] where a word allows; a word that does not fit in
//!   [`LINE_MAX_BYTES`] is split, which inserts a space when the field is unfolded.
//! * The MIME boundary is checked against the content of every part and changed until it
//!   occurs in none of them (RFC 2046 §5.1.1), so no returned header and no reply text
//!   can end a part early.
//!
//! # Internationalized reports (RFC 6533)
//!
//! When the original envelope sender or any recipient address is not ASCII (SMTPUTF8 mail,
//! RFC 6531), [`needs_smtputf8`] is true and the report is internationalized:
//!
//! * the second part is `message/global-delivery-status` (RFC 6533 §6) and a non-ASCII
//!   recipient is written `Final-Recipient: utf-8; <address>` in the RFC 6533 §3
//!   `utf-8-addr-unitext` form (UTF-8 kept, `\`, `+`, `=`, space and controls escaped as
//!   `\x{HH}`); ASCII recipients stay `rfc822;`;
//! * the third part is `message/global-headers` (RFC 6533 §6);
//! * the `To:` field carries the UTF-8 address as is (RFC 6532 §3.2), and parts holding
//!   UTF-8 are labelled `Content-Transfer-Encoding: 8bit`.
//!
//! The caller must then send it with `SMTPUTF8` and `BODY=8BITMIME`. Otherwise the whole
//! report is 7-bit US-ASCII with lines of at most [`LINE_MAX_BYTES`] and needs neither:
//! returned headers that are not 7-bit clean (raw 8-bit bytes, NUL, over-long lines) are
//! sent quoted-printable (RFC 2045 §6.7), as RFC 6522 §3 suggests for broken headers.
//!
//! Not produced: `Original-Recipient` and `Original-Envelope-Id` (RFC 3464 §2.3.1, §2.2.1)
//! need the DSN parameters of the original transaction (RFC 3461 §4), which the queue
//! does not keep; `Will-Retry-Until` needs the retry schedule.

use std::collections::HashSet;
use std::fmt::Write as _;

pub use tsubame_smtp_proto::date::{CivilDate, parse_rfc3339_ms, rfc3339_ms, rfc5322_date};

/// Longest line of the report, CRLF excluded: the hard limit of RFC 5322 §2.1.1.
pub const LINE_MAX_BYTES: usize = 998;

/// Length that text and folded fields are wrapped to where the words allow: the
/// "SHOULD be no more than 78 characters" of RFC 5322 §2.1.1.
pub const LINE_PREFERRED_BYTES: usize = 78;

/// Most bytes of an upstream reply shown as `Diagnostic-Code` and in the text part; the
/// rest is cut and marked with `TRUNCATION_MARK`.
///
/// Four reply lines of the 512 octets RFC 5321 §4.5.3.1.5 sets as the minimum line length:
/// enough for a multi-line rejection with its explanation URL, while a peer that sends
/// the 400 KiB the reply parser accepts (`MAX_REPLY_LINES` × `MAX_REPLY_LINE_BYTES`)
/// cannot make every bounce that large.
pub const DIAGNOSTIC_MAX_BYTES: usize = 4 * 512;

/// Most bytes of the original message's header section returned in the third part.
///
/// Chosen, not measured: real header sections are a few KiB (a long `Received:` chain
/// or a DKIM signature adds one or two KiB each). The limit matters for an original with
/// no blank line, whose "header section" is then the whole message. A cut is made at a
/// line end where there is one, and the text part says the headers were cut.
pub const RETURNED_HEADERS_MAX_BYTES: usize = 64 * 1024;

/// Appended to a diagnostic cut at [`DIAGNOSTIC_MAX_BYTES`].
const TRUNCATION_MARK: &str = " [...]";

/// Longest MIME boundary (RFC 2046 §5.1.1: 1 to 70 characters).
const BOUNDARY_MAX_BYTES: usize = 70;

/// Start of every boundary. `=_` never occurs in quoted-printable output (`=` is always
/// followed by two hex digits or a line end there), so returned headers sent
/// quoted-printable cannot collide with it; other content is checked.
const BOUNDARY_PREFIX: &str = "=_tsubame_dsn_";

/// Hex digits of the counter appended to a boundary that occurred in the content: 16
/// digits cover every `u64`, and a counter that exceeds the number of occurrences of the
/// unsuffixed boundary always exists (see [`choose_boundary`]).
const BOUNDARY_COUNTER_DIGITS: usize = 16;

/// Bytes taken from the Message-ID for the boundary: what is left of
/// [`BOUNDARY_MAX_BYTES`] after the prefix and the `.` + counter suffix.
const BOUNDARY_ID_MAX_BYTES: usize =
    BOUNDARY_MAX_BYTES - BOUNDARY_PREFIX.len() - 1 - BOUNDARY_COUNTER_DIGITS;

/// Quoted-printable lines are at most 76 characters, soft line break `=` included
/// (RFC 2045 §6.7 rule 5).
const QUOTED_PRINTABLE_LINE_MAX_BYTES: usize = 76;

/// Fallback status when the one given is malformed or contradicts the action: "other
/// undefined status" of the right class (RFC 3463 §3.1).
const FALLBACK_STATUS_FAILED: &str = "5.0.0";
const FALLBACK_STATUS_DELAYED: &str = "4.0.0";

/// Most digits of the subject and the detail of an enhanced status code (RFC 3463 §2:
/// `subject = 1*3digit`, `detail = 1*3digit`).
const STATUS_PART_MAX_DIGITS: usize = 3;

/// What happened to one recipient (RFC 3464 §2.3.3). `delivered`, `relayed` and
/// `expanded` are success notifications, which tsubame does not send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnAction {
    /// Delivery failed for good; the message will not be retried for this recipient.
    Failed,
    /// Delivery has not succeeded yet and is still being retried (a warning).
    Delayed,
}

impl DsnAction {
    /// The `Action:` value (RFC 3464 §2.3.3).
    fn field_value(self) -> &'static str {
        match self {
            DsnAction::Failed => "failed",
            DsnAction::Delayed => "delayed",
        }
    }
}

/// One recipient the report is about.
#[derive(Debug, Clone, Copy)]
pub struct DsnRecipient<'a> {
    /// The envelope recipient (RCPT TO) without angle brackets, written as
    /// `Final-Recipient` (RFC 3464 §2.3.2).
    pub address: &'a str,
    pub action: DsnAction,
    /// Enhanced status code such as `5.1.1` (RFC 3463). A malformed code, or one whose
    /// class contradicts `action` (`Failed` needs 4 or 5, `Delayed` needs 4), is replaced
    /// by `5.0.0` or `4.0.0`. `Failed` accepts class 4 because a message that expires
    /// after transient failures fails with the last, transient, status (e.g. 4.4.7).
    pub status: &'a str,
    /// Host name of the upstream whose reply is `diagnostic`, if one answered
    /// (`Remote-MTA: dns; ...`, RFC 3464 §2.3.5).
    pub remote_mta: Option<&'a str>,
    /// The upstream's reply, e.g. `550 5.1.1 no such user`, written as
    /// `Diagnostic-Code: smtp; ...` (RFC 3464 §2.3.6). Line breaks of a multi-line reply
    /// become spaces.
    pub diagnostic: Option<&'a str>,
    /// When delivery to this recipient was last tried (RFC 3464 §2.3.7).
    pub last_attempt_unix_ms: Option<u64>,
}

/// Everything a report is made from.
#[derive(Debug, Clone, Copy)]
pub struct DsnInput<'a> {
    /// Our host name: `Reporting-MTA: dns; ...` (RFC 3464 §2.2.2) and the domain of the
    /// `From:` address.
    pub reporting_mta: &'a str,
    /// The reported message's envelope sender, to whom the report goes (`To:`). Never
    /// empty: no report is made for the null sender (see [`is_bounceable`]).
    pub original_mail_from: &'a str,
    /// When the reported message was received (`Arrival-Date`, RFC 3464 §2.2.5).
    pub arrival_unix_ms: u64,
    /// When the report is made (`Date:`).
    pub now_unix_ms: u64,
    /// Our id for the reported message, shown in the text part so the sender can quote
    /// it to the postmaster.
    pub queue_id: &'a str,
    /// The report's own Message-ID without angle brackets (RFC 5322 §3.6.4 `id-left "@"
    /// id-right`), chosen by the caller. Whitespace, controls, `<` and `>` are dropped.
    pub message_id: &'a str,
    /// The reported message as stored (CRLF lines); only its header section is used.
    pub original_message: &'a [u8],
    /// The recipients the report is about. Must not be empty: RFC 3464 §2.1 requires at
    /// least one per-recipient group.
    pub recipients: &'a [DsnRecipient<'a>],
}

/// Whether a message from envelope sender `mail_from` (without angle brackets) may be
/// reported on.
///
/// False only for the null sender `""`: a message with the null reverse-path is itself a
/// notification, and RFC 5321 §4.5.5 and §6.1 forbid notifications about it so that two
/// failing systems cannot bounce at each other forever. `MAILER-DAEMON@...` and similar
/// local parts are deliberately not special: no RFC names them, a real mailbox may be
/// called that, and loops are already prevented by the null reverse-path every report is
/// sent with and by `Auto-Submitted: auto-replied` (RFC 3834 §2).
pub fn is_bounceable(mail_from: &str) -> bool {
    !mail_from.is_empty()
}

/// Whether the report for `input` is internationalized (RFC 6533): true when the original
/// envelope sender or a recipient address is not ASCII. The report then holds UTF-8 and
/// must be sent with `SMTPUTF8` (RFC 6531) and `BODY=8BITMIME`; when false it is 7-bit
/// US-ASCII and needs neither.
pub fn needs_smtputf8(input: &DsnInput<'_>) -> bool {
    !input.original_mail_from.is_ascii()
        || input
            .recipients
            .iter()
            .any(|recipient| !recipient.address.is_ascii())
}

/// The complete report: an RFC 5322 message with CRLF line endings, ready to be sent
/// with `MAIL FROM:<>` to `input.original_mail_from`. See the module documentation for
/// its structure and for what is done with untrusted text.
pub fn build_dsn(input: &DsnInput<'_>) -> Vec<u8> {
    debug_assert!(
        !input.recipients.is_empty(),
        "RFC 3464 §2.1: a report names at least one recipient"
    );
    let international = needs_smtputf8(input);
    let returned = returned_headers(input.original_message, international);
    let parts = [
        notification_part(input, international, returned.truncated),
        delivery_status_part(input, international),
        returned.part,
    ];
    let boundary = choose_boundary(
        &boundary_base(input.message_id),
        parts.iter().map(|part| part.content.as_slice()),
    );

    let content_bytes: usize = parts.iter().map(|part| part.content.len()).sum();
    // Headers, part headers and delimiters are well under 4 KiB.
    let mut out = Vec::with_capacity(content_bytes + 4096);
    write_message_header(&mut out, input, international, &boundary);
    out.extend_from_slice(b"\r\nThis is a MIME-encapsulated delivery status notification.\r\n");
    for part in &parts {
        // The CRLF before each delimiter belongs to the delimiter (RFC 2046 §5.1.1), so
        // every part's content keeps its own final CRLF.
        out.extend_from_slice(b"\r\n--");
        out.extend_from_slice(boundary.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(part.header.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&part.content);
    }
    out.extend_from_slice(b"\r\n--");
    out.extend_from_slice(boundary.as_bytes());
    out.extend_from_slice(b"--\r\n");
    out
}

/// One MIME body part: its header section (each field ending in CRLF, without the blank
/// line) and its content (empty, or ending in CRLF).
#[derive(Debug)]
struct Part {
    header: String,
    content: Vec<u8>,
}

impl Part {
    /// A part whose content is text this module wrote: only addresses can make it
    /// non-ASCII, and those are UTF-8 with lines within [`LINE_MAX_BYTES`] (8bit data,
    /// RFC 2045 §2.8).
    fn generated(content_type: &str, description: &str, content: Vec<u8>) -> Part {
        let mut header =
            format!("Content-Type: {content_type}\r\nContent-Description: {description}\r\n");
        if !content.is_ascii() {
            header.push_str("Content-Transfer-Encoding: 8bit\r\n");
        }
        Part { header, content }
    }
}

fn write_message_header(
    out: &mut Vec<u8>,
    input: &DsnInput<'_>,
    international: bool,
    boundary: &str,
) {
    let reporting_mta = single_line_ascii(input.reporting_mta);
    let all_delayed = input
        .recipients
        .iter()
        .all(|recipient| recipient.action == DsnAction::Delayed);
    let subject = if all_delayed {
        "Delayed Mail (still being retried)"
    } else {
        "Undelivered Mail Returned to Sender"
    };
    push_wrapped(
        out,
        "From: ",
        " ",
        &format!("Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"),
    );
    push_wrapped(
        out,
        "To: ",
        " ",
        &format!(
            "<{}>",
            address_text(input.original_mail_from, international)
        ),
    );
    push_wrapped(out, "Subject: ", " ", subject);
    push_wrapped(out, "Date: ", " ", &rfc5322_date(input.now_unix_ms));
    push_wrapped(
        out,
        "Message-ID: ",
        " ",
        &format!("<{}>", message_id_text(input.message_id)),
    );
    // RFC 3834 §5: marks the report as automatic so that auto-responders leave it alone.
    push_wrapped(out, "Auto-Submitted: ", " ", "auto-replied");
    push_wrapped(out, "MIME-Version: ", " ", "1.0");
    push_wrapped(
        out,
        "Content-Type: ",
        " ",
        &format!("multipart/report; report-type=delivery-status; boundary=\"{boundary}\""),
    );
}

/// The first part: the report in words.
fn notification_part(input: &DsnInput<'_>, international: bool, headers_truncated: bool) -> Part {
    let reporting_mta = single_line_ascii(input.reporting_mta);
    let any_failed = input
        .recipients
        .iter()
        .any(|recipient| recipient.action == DsnAction::Failed);
    let any_delayed = input
        .recipients
        .iter()
        .any(|recipient| recipient.action == DsnAction::Delayed);

    let mut text = Vec::new();
    push_wrapped(
        &mut text,
        "",
        "",
        &format!("This is the mail delivery system at {reporting_mta}."),
    );
    text.extend_from_slice(b"\r\n");
    if any_failed {
        push_wrapped(
            &mut text,
            "",
            "",
            "Your message could not be delivered to the recipients marked \"failed\" \
             below. This is a permanent error: it will not be retried for them.",
        );
    }
    if any_delayed {
        push_wrapped(
            &mut text,
            "",
            "",
            "Delivery to the recipients marked \"delayed\" below has not succeeded yet \
             and is still being retried; you do not need to send the message again.",
        );
    }
    text.extend_from_slice(b"\r\n");
    push_wrapped(
        &mut text,
        "Queue ID: ",
        "    ",
        &single_line_ascii(input.queue_id),
    );
    push_wrapped(
        &mut text,
        "Arrived:  ",
        "    ",
        &rfc5322_date(input.arrival_unix_ms),
    );

    for recipient in input.recipients {
        text.extend_from_slice(b"\r\n");
        let status = status_code(recipient.status, recipient.action);
        push_wrapped(
            &mut text,
            "",
            "    ",
            &format!(
                "<{}>: {} (status {status})",
                address_text(recipient.address, international),
                recipient.action.field_value(),
            ),
        );
        let said = match (recipient.remote_mta, recipient.diagnostic) {
            (Some(host), Some(reply)) => format!(
                "{} said: {}",
                single_line_ascii(host),
                diagnostic_text(reply)
            ),
            (None, Some(reply)) => format!("Reason: {}", diagnostic_text(reply)),
            (Some(host), None) => format!("Last tried at {}.", single_line_ascii(host)),
            (None, None) => "No remote server replied.".to_owned(),
        };
        push_wrapped(&mut text, "    ", "    ", &said);
    }

    text.extend_from_slice(b"\r\n");
    let closing = if headers_truncated {
        "The headers of your message are attached, cut short because they were too long."
    } else {
        "The headers of your message are attached."
    };
    push_wrapped(&mut text, "", "", closing);

    let content_type = if text.is_ascii() {
        "text/plain; charset=us-ascii"
    } else {
        "text/plain; charset=utf-8"
    };
    Part::generated(content_type, "Notification", text)
}

/// The second part: the machine-readable report (RFC 3464 §2).
fn delivery_status_part(input: &DsnInput<'_>, international: bool) -> Part {
    let mut report = Vec::new();
    push_wrapped(
        &mut report,
        "Reporting-MTA: ",
        " ",
        &format!("dns; {}", single_line_ascii(input.reporting_mta)),
    );
    push_wrapped(
        &mut report,
        "Arrival-Date: ",
        " ",
        &rfc5322_date(input.arrival_unix_ms),
    );

    for recipient in input.recipients {
        // Each per-recipient group is preceded by a blank line (RFC 3464 §2.1).
        report.extend_from_slice(b"\r\n");
        let final_recipient = if recipient.address.is_ascii() {
            format!("rfc822; {}", address_text(recipient.address, false))
        } else {
            // Only reached when `international`: a non-ASCII address is what makes it so.
            format!("utf-8; {}", utf8_addr_unitext(recipient.address))
        };
        push_wrapped(&mut report, "Final-Recipient: ", " ", &final_recipient);
        push_wrapped(&mut report, "Action: ", " ", recipient.action.field_value());
        push_wrapped(
            &mut report,
            "Status: ",
            " ",
            status_code(recipient.status, recipient.action),
        );
        if let Some(host) = recipient.remote_mta {
            push_wrapped(
                &mut report,
                "Remote-MTA: ",
                " ",
                &format!("dns; {}", single_line_ascii(host)),
            );
        }
        if let Some(reply) = recipient.diagnostic {
            push_wrapped(
                &mut report,
                "Diagnostic-Code: ",
                " ",
                &format!("smtp; {}", diagnostic_text(reply)),
            );
        }
        if let Some(last_attempt_unix_ms) = recipient.last_attempt_unix_ms {
            push_wrapped(
                &mut report,
                "Last-Attempt-Date: ",
                " ",
                &rfc5322_date(last_attempt_unix_ms),
            );
        }
    }

    let content_type = if international {
        "message/global-delivery-status"
    } else {
        "message/delivery-status"
    };
    Part::generated(content_type, "Delivery report", report)
}

/// The third part and whether the header section was cut at
/// [`RETURNED_HEADERS_MAX_BYTES`].
#[derive(Debug)]
struct ReturnedHeaders {
    part: Part,
    truncated: bool,
}

/// The header section of `original`: everything before the first empty line, or all of
/// it when there is none. CRLF, bare LF and bare CR all end a line (as RFC 5322 readers
/// such as Python's `email` treat them) and every line is written with CRLF.
fn returned_headers(original: &[u8], international: bool) -> ReturnedHeaders {
    let mut section = Vec::new();
    let mut truncated = false;
    for line in lines(original) {
        if line.is_empty() {
            break;
        }
        let room = RETURNED_HEADERS_MAX_BYTES.saturating_sub(section.len());
        if line.len() + 2 > room {
            truncated = true;
            // Keep the start of a single over-long first line rather than nothing; later
            // lines are dropped whole so no field is cut in the middle.
            if section.is_empty() {
                section.extend_from_slice(line.get(..room.saturating_sub(2)).unwrap_or(line));
                section.extend_from_slice(b"\r\n");
            }
            break;
        }
        section.extend_from_slice(line);
        section.extend_from_slice(b"\r\n");
    }

    let content_type = if international {
        // RFC 6533 §6: the counterpart of text/rfc822-headers whose content may be UTF-8.
        "message/global-headers"
    } else {
        "text/rfc822-headers"
    };
    let mut header = format!(
        "Content-Type: {content_type}\r\nContent-Description: Undelivered message headers\r\n"
    );
    let content = if is_mime_line_data(&section, international) {
        if !section.is_ascii() {
            header.push_str("Content-Transfer-Encoding: 8bit\r\n");
        }
        section
    } else {
        header.push_str("Content-Transfer-Encoding: quoted-printable\r\n");
        quoted_printable(&section)
    };
    ReturnedHeaders {
        part: Part { header, content },
        truncated,
    }
}

/// Whether `content` (CRLF lines) can be sent as is: 7bit data (RFC 2045 §2.7) or, when
/// `utf8_allowed`, UTF-8 8bit data (RFC 2045 §2.8, RFC 6532 §3): no NUL and no line
/// longer than [`LINE_MAX_BYTES`].
fn is_mime_line_data(content: &[u8], utf8_allowed: bool) -> bool {
    let bytes_allowed = if utf8_allowed {
        std::str::from_utf8(content).is_ok()
    } else {
        content.is_ascii()
    };
    bytes_allowed
        && !content.contains(&0)
        && lines(content).all(|line| line.len() <= LINE_MAX_BYTES)
}

/// The lines of `bytes` without their endings; CRLF, LF and CR each end a line. A final
/// line without an ending is returned too; an ending at the very end starts no new line.
fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let Some(end) = rest.iter().position(|&byte| byte == b'\r' || byte == b'\n') else {
            let line = rest;
            rest = &[];
            return Some(line);
        };
        let (line, after) = rest.split_at(end);
        let ending_bytes = if after.starts_with(b"\r\n") { 2 } else { 1 };
        rest = after.get(ending_bytes..).unwrap_or(&[]);
        Some(line)
    })
}

/// `content` (CRLF lines) in quoted-printable (RFC 2045 §6.7): printable ASCII except `=`
/// as is, space and tab as is except at a line end, everything else `=HH`, lines cut with
/// soft line breaks at [`QUOTED_PRINTABLE_LINE_MAX_BYTES`].
fn quoted_printable(content: &[u8]) -> Vec<u8> {
    const HEX_DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(content.len() + content.len() / 2);
    for line in lines(content) {
        let mut column = 0;
        for (index, &byte) in line.iter().enumerate() {
            let last = index + 1 == line.len();
            let literal = matches!(byte, b'!'..=b'<' | b'>'..=b'~')
                || (matches!(byte, b' ' | b'\t') && !last);
            let width = if literal { 1 } else { 3 };
            // Room for the `=` of a soft line break, unless this is the line's last byte.
            let limit = if last {
                QUOTED_PRINTABLE_LINE_MAX_BYTES
            } else {
                QUOTED_PRINTABLE_LINE_MAX_BYTES - 1
            };
            if column + width > limit {
                out.extend_from_slice(b"=\r\n");
                column = 0;
            }
            if literal {
                out.push(byte);
            } else {
                out.push(b'=');
                out.push(HEX_DIGITS[usize::from(byte >> 4)]);
                out.push(HEX_DIGITS[usize::from(byte & 0x0f)]);
            }
            column += width;
        }
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The boundary before uniqueness is checked: [`BOUNDARY_PREFIX`] and the characters of
/// the Message-ID that are safe in a boundary (RFC 2046 §5.1.1 `bchars`, a subset).
fn boundary_base(message_id: &str) -> String {
    let mut base = BOUNDARY_PREFIX.to_owned();
    base.extend(
        message_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            .take(BOUNDARY_ID_MAX_BYTES),
    );
    base
}

/// A boundary that occurs in none of `contents`: `base` itself if it occurs nowhere, else
/// `base` + `.` + the smallest 16-hex-digit counter that does not follow any occurrence of
/// `base`.
///
/// A suffixed candidate can only occur where `base` occurs, followed by its suffix; each
/// occurrence is followed by at most one suffix, so of the counters `0..=n` for `n`
/// occurrences at least one is free and the search ends (pigeonhole). One pass over the
/// content, no quadratic rescans.
fn choose_boundary<'a>(base: &str, contents: impl Iterator<Item = &'a [u8]>) -> String {
    let suffix_bytes = 1 + BOUNDARY_COUNTER_DIGITS;
    // One searcher for every part. Occurrences of `base` cannot overlap (its only `=` is
    // its first byte), so the non-overlapping matches are all of them.
    debug_assert!(
        base.starts_with('=') && base.rfind('=') == Some(0),
        "{base}"
    );
    let finder = memchr::memmem::Finder::new(base.as_bytes());
    let mut taken_suffixes: HashSet<&[u8]> = HashSet::new();
    let mut occurs = false;
    for content in contents {
        for found in finder.find_iter(content) {
            occurs = true;
            let after = found + base.len();
            if let Some(suffix) = content.get(after..after + suffix_bytes) {
                taken_suffixes.insert(suffix);
            }
        }
    }
    if !occurs {
        return base.to_owned();
    }
    let mut counter: u64 = 0;
    loop {
        let candidate = format!(".{counter:016x}");
        if !taken_suffixes.contains(candidate.as_bytes()) {
            return format!("{base}{candidate}");
        }
        // Cannot overflow: `counter` stays at most `taken_suffixes.len()` (see above).
        counter += 1;
    }
}

/// `text` (from a peer or the caller) made safe for one field value or one line: every run
/// of whitespace and control characters becomes one space, so it can neither end a field
/// nor start one (header injection); non-ASCII becomes `?`, since message/delivery-status
/// is 7-bit (RFC 3464 §2.1) and these values are ASCII in every report; leading and
/// trailing spaces are dropped.
fn single_line_ascii(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.chars() {
        if c.is_whitespace() || is_line_breaking(c) {
            pending_space = !out.is_empty();
            continue;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        out.push(if c.is_ascii() { c } else { '?' });
    }
    out
}

/// An upstream reply as one line of ASCII, cut at [`DIAGNOSTIC_MAX_BYTES`].
fn diagnostic_text(reply: &str) -> String {
    let mut text = single_line_ascii(reply);
    if text.len() > DIAGNOSTIC_MAX_BYTES {
        // ASCII only, so every index is a character boundary.
        text.truncate(DIAGNOSTIC_MAX_BYTES);
        text.push_str(TRUNCATION_MARK);
    }
    text
}

/// The Message-ID value: printable ASCII other than `<`, `>` (which would end the
/// `msg-id`, RFC 5322 §3.6.4) and space.
fn message_id_text(message_id: &str) -> String {
    message_id
        .chars()
        .filter(|c| c.is_ascii_graphic() && !matches!(c, '<' | '>'))
        .collect()
}

/// An address as written in `To:`, the text part and `Final-Recipient: rfc822;`: control
/// characters become `?` (so none can end the field), and so does non-ASCII unless
/// `utf8_allowed` (only ever needed for a non-ASCII address, which makes the report
/// international). Spaces stay: a quoted local part may hold them.
fn address_text(address: &str, utf8_allowed: bool) -> String {
    address
        .chars()
        .map(|c| {
            if is_line_breaking(c) || (!utf8_allowed && !c.is_ascii()) {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// `address` in the RFC 6533 §3 `utf-8-addr-unitext` form: characters other than space,
/// `\`, `+` and `=` as they are (`QUCHAR`), those four as `\x{HH}`
/// (`EmbeddedUnicodeChar`). Control characters become `?`, as in [`address_text`]: the
/// grammar's `HEXPOINT` has no escape for most of them (CR and LF among them), and a
/// line separator must not reach the report either way.
fn utf8_addr_unitext(address: &str) -> String {
    let mut out = String::with_capacity(address.len());
    for c in address.chars() {
        if is_line_breaking(c) {
            out.push('?');
        } else if matches!(c, ' ' | '\\' | '+' | '=') {
            // Writing to a String cannot fail.
            let _ = write!(out, "\\x{{{:02X}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

/// Control characters (C0, DEL, C1 with NEL) and the Unicode line and paragraph
/// separators, which some readers (Python's `str.splitlines`, for one) take as line ends.
fn is_line_breaking(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// `status` if it is a well-formed enhanced status code (RFC 3463 §2) whose class fits
/// `action`, else the fallback of the action's class.
fn status_code(status: &str, action: DsnAction) -> &str {
    let mut pieces = status.split('.');
    let class = pieces.next();
    let subject = pieces.next();
    let detail = pieces.next();
    let digits = |piece: Option<&str>| {
        piece.is_some_and(|piece| {
            (1..=STATUS_PART_MAX_DIGITS).contains(&piece.len())
                && piece.bytes().all(|byte| byte.is_ascii_digit())
        })
    };
    let class_fits = match action {
        DsnAction::Failed => matches!(class, Some("4" | "5")),
        DsnAction::Delayed => class == Some("4"),
    };
    if class_fits && digits(subject) && digits(detail) && pieces.next().is_none() {
        status
    } else {
        match action {
            DsnAction::Failed => FALLBACK_STATUS_FAILED,
            DsnAction::Delayed => FALLBACK_STATUS_DELAYED,
        }
    }
}

/// Appends `text` as one or more CRLF-ended lines: the first begins with `first_prefix`,
/// the others with `continuation_prefix`. Lines are broken at spaces (the space is
/// replaced by the break) so they stay within [`LINE_PREFERRED_BYTES`] where the words
/// allow; a word that does not fit in [`LINE_MAX_BYTES`] is split at a character
/// boundary.
///
/// With `continuation_prefix` = `" "` this is header folding (RFC 5322 §2.2.3): unfolding
/// gives back `text`, except that a split word gains a space. `text` must hold no CR or
/// LF (callers pass sanitized values); prefixes are short constants.
fn push_wrapped(out: &mut Vec<u8>, first_prefix: &str, continuation_prefix: &str, text: &str) {
    debug_assert!(
        !text.contains(['\r', '\n']),
        "line breaks must be sanitized away"
    );
    debug_assert!(first_prefix.len().max(continuation_prefix.len()) + 4 < LINE_MAX_BYTES);
    out.extend_from_slice(first_prefix.as_bytes());
    let mut line_bytes = first_prefix.len();
    let mut line_has_word = false;
    for word in text.split(' ') {
        let mut word = word;
        loop {
            let separator_bytes = usize::from(line_has_word);
            // Fold before a word that would go past the preferred length, and before the
            // space of an empty word (a run of spaces) that would go past the maximum: the
            // fold takes the place of that space (found by the dsn fuzz target, where a
            // long address followed by spaces made a line of 1012 bytes).
            if line_has_word
                && ((!word.is_empty()
                    && line_bytes + separator_bytes + word.len() > LINE_PREFERRED_BYTES)
                    || line_bytes + separator_bytes > LINE_MAX_BYTES)
            {
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(continuation_prefix.as_bytes());
                line_bytes = continuation_prefix.len();
                line_has_word = false;
                continue;
            }
            let room = LINE_MAX_BYTES.saturating_sub(line_bytes + separator_bytes);
            if separator_bytes == 1 {
                out.push(b' ');
            }
            if word.len() <= room {
                out.extend_from_slice(word.as_bytes());
                line_bytes += separator_bytes + word.len();
                line_has_word = line_has_word || !word.is_empty();
                break;
            }
            // Only reached on a line without a word yet (a word that fits the preferred
            // length fits the maximum too), where `room` is at least
            // LINE_MAX_BYTES - prefix - 0 > 4, so `cut` > 0 and the loop advances.
            let mut cut = room;
            while !word.is_char_boundary(cut) {
                cut -= 1;
            }
            let (head, tail) = word.split_at(cut);
            out.extend_from_slice(head.as_bytes());
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(continuation_prefix.as_bytes());
            line_bytes = continuation_prefix.len();
            line_has_word = false;
            word = tail;
        }
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests;
