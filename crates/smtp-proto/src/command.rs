//! RFC 5321 command lines, parsed without allocation.

use crate::reply::{EnhancedCode, Reply};

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
    /// The reply for this error (RFC 5321 §4.2.3 codes, RFC 3463 enhanced codes).
    ///
    /// `NotUtf8` answers 501 5.5.2 (syntax error in parameters), not 5.6.7: the verb was
    /// recognised (it is ASCII), so the bytes after it are malformed arguments; 5.6.7
    /// (RFC 6531) says a well-formed non-ASCII address is not allowed, which is a
    /// different complaint.
    pub fn reply(&self) -> Reply {
        match self {
            Self::UnknownCommand => {
                Reply::new(500, EnhancedCode::new(5, 5, 1), "Command not recognised")
            }
            Self::Syntax(detail) => Reply::owned(
                501,
                Some(EnhancedCode::new(5, 5, 2)),
                format!("Syntax error: {detail}"),
            ),
            Self::BadSender(detail) => Reply::owned(
                501,
                Some(EnhancedCode::new(5, 1, 7)),
                format!("Bad sender address: {detail}"),
            ),
            Self::BadRecipient(detail) => Reply::owned(
                501,
                Some(EnhancedCode::new(5, 1, 3)),
                format!("Bad recipient address: {detail}"),
            ),
            Self::UnknownParameter => Reply::new(
                555,
                EnhancedCode::new(5, 5, 4),
                "Parameter not recognised or not implemented",
            ),
            Self::BadParameter(detail) => Reply::owned(
                501,
                Some(EnhancedCode::new(5, 5, 4)),
                format!("Bad parameter: {detail}"),
            ),
            Self::NotUtf8 => Reply::new(
                501,
                EnhancedCode::new(5, 5, 2),
                "Command line is not valid UTF-8",
            ),
        }
    }
}

/// Longest local part, in octets (RFC 5321 §4.5.3.1.1).
pub const MAX_LOCAL_PART_BYTES: usize = 64;
/// Longest domain, in octets (RFC 5321 §4.5.3.1.2).
pub const MAX_DOMAIN_BYTES: usize = 255;
/// Longest reverse-path or forward-path, in octets, angle brackets and any source route
/// included (RFC 5321 §4.5.3.1.3: "including the punctuation and element separators").
pub const MAX_PATH_BYTES: usize = 256;
/// Longest label of a domain name, in octets (RFC 1035 §2.3.4), applied to U-labels as
/// written too: a longer UTF-8 label cannot become a valid A-label either.
pub const MAX_DOMAIN_LABEL_BYTES: usize = 63;

/// The verbs we know. Matched case-insensitively (RFC 5321 §2.4) without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Ehlo,
    Helo,
    Mail,
    Rcpt,
    Data,
    Bdat,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    Auth,
    StartTls,
}

fn verb(word: &[u8]) -> Option<Verb> {
    match *word {
        [a, b, c, d] => match [
            a.to_ascii_uppercase(),
            b.to_ascii_uppercase(),
            c.to_ascii_uppercase(),
            d.to_ascii_uppercase(),
        ] {
            [b'E', b'H', b'L', b'O'] => Some(Verb::Ehlo),
            [b'H', b'E', b'L', b'O'] => Some(Verb::Helo),
            [b'M', b'A', b'I', b'L'] => Some(Verb::Mail),
            [b'R', b'C', b'P', b'T'] => Some(Verb::Rcpt),
            [b'D', b'A', b'T', b'A'] => Some(Verb::Data),
            [b'B', b'D', b'A', b'T'] => Some(Verb::Bdat),
            [b'R', b'S', b'E', b'T'] => Some(Verb::Rset),
            [b'N', b'O', b'O', b'P'] => Some(Verb::Noop),
            [b'Q', b'U', b'I', b'T'] => Some(Verb::Quit),
            [b'V', b'R', b'F', b'Y'] => Some(Verb::Vrfy),
            [b'E', b'X', b'P', b'N'] => Some(Verb::Expn),
            [b'H', b'E', b'L', b'P'] => Some(Verb::Help),
            [b'A', b'U', b'T', b'H'] => Some(Verb::Auth),
            _ => None,
        },
        _ if word.eq_ignore_ascii_case(b"STARTTLS") => Some(Verb::StartTls),
        _ => None,
    }
}

/// Parses one command line, without its terminator.
///
/// The verb is recognised first, so a line of garbage is `UnknownCommand` (500) even
/// when it is not UTF-8. The whole line must then be UTF-8 (RFC 6531 lets addresses be
/// UTF-8; whether the client announced SMTPUTF8 is the session's business) and free of
/// control characters: a CR, NUL or TAB on a command line is never legitimate
/// (RFC 5321 §4.1: arguments are separated by SP) and is a classic smuggling probe.
///
/// Tolerated on purpose, because deployed clients do it: spaces after the argument,
/// more than one space between arguments, a space after `FROM:` / `TO:`.
pub fn parse_command(line: &[u8]) -> Result<Command<'_>, CommandError> {
    let word_end = line
        .iter()
        .position(|&byte| byte == b' ')
        .unwrap_or(line.len());
    let verb = verb(line.get(..word_end).unwrap_or(line)).ok_or(CommandError::UnknownCommand)?;
    let text = std::str::from_utf8(line).map_err(|_| CommandError::NotUtf8)?;
    if text.bytes().any(|byte| byte.is_ascii_control()) {
        return Err(CommandError::Syntax("control character in command line"));
    }
    let argument = text
        .get(word_end..)
        .map(|rest| rest.trim_matches(' '))
        .filter(|rest| !rest.is_empty());
    match verb {
        Verb::Ehlo => Ok(Command::Ehlo {
            domain: greeting_domain(argument, "EHLO needs a domain")?,
        }),
        Verb::Helo => Ok(Command::Helo {
            domain: greeting_domain(argument, "HELO needs a domain")?,
        }),
        Verb::Mail => parse_mail(argument),
        Verb::Rcpt => parse_rcpt(argument),
        Verb::Data => without_argument(argument, Command::Data, "DATA takes no argument"),
        Verb::Bdat => parse_bdat(argument),
        Verb::Rset => without_argument(argument, Command::Rset, "RSET takes no argument"),
        // RFC 5321 §4.1.1.9: NOOP may carry a string, which is ignored.
        Verb::Noop => Ok(Command::Noop),
        Verb::Quit => without_argument(argument, Command::Quit, "QUIT takes no argument"),
        Verb::Vrfy => argument
            .map(|argument| Command::Vrfy { argument })
            .ok_or(CommandError::Syntax("VRFY needs an argument")),
        Verb::Expn => argument
            .map(|argument| Command::Expn { argument })
            .ok_or(CommandError::Syntax("EXPN needs an argument")),
        Verb::Help => Ok(Command::Help { topic: argument }),
        Verb::Auth => parse_auth(argument),
        Verb::StartTls => {
            without_argument(argument, Command::StartTls, "STARTTLS takes no argument")
        }
    }
}

fn without_argument<'a>(
    argument: Option<&str>,
    command: Command<'a>,
    error: &'static str,
) -> Result<Command<'a>, CommandError> {
    match argument {
        None => Ok(command),
        Some(_) => Err(CommandError::Syntax(error)),
    }
}

/// The domain of EHLO/HELO: the first word of the argument. Its syntax is not checked
/// and further words are ignored: printers and scanners send names such as
/// `HELO Printer_3F` or `HELO my printer`, RFC 5321 §4.1.4 says a server must not refuse
/// mail because the greeting name is wrong, and the name is only logged.
fn greeting_domain<'a>(
    argument: Option<&'a str>,
    error: &'static str,
) -> Result<&'a str, CommandError> {
    argument
        .and_then(|argument| argument.split(' ').next())
        .ok_or(CommandError::Syntax(error))
}

/// Strips `prefix` (ASCII) from the start of `text`, ignoring case.
fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix) {
        text.get(prefix.len()..)
    } else {
        None
    }
}

/// `MAIL FROM:<reverse-path> [parameters]` (RFC 5321 §4.1.1.2).
fn parse_mail(argument: Option<&str>) -> Result<Command<'_>, CommandError> {
    const EXPECTED: CommandError = CommandError::Syntax("expected MAIL FROM:<address>");
    let path_text = argument
        .and_then(|argument| strip_prefix_ignore_case(argument, "FROM:"))
        .ok_or(EXPECTED)?;
    let (path, after_path) =
        parse_path(path_text.trim_start_matches(' ')).map_err(CommandError::BadSender)?;
    let from = match path {
        Path::Null => ReversePath::Null,
        Path::Mailbox(address) => ReversePath::Mailbox(address),
        Path::Postmaster(_) => {
            return Err(CommandError::BadSender(
                "postmaster without a domain is only a recipient",
            ));
        }
    };
    let parameters = mail_parameters(parameters_text(after_path)?)?;
    Ok(Command::Mail { from, parameters })
}

/// `RCPT TO:<forward-path> [parameters]` (RFC 5321 §4.1.1.3).
fn parse_rcpt(argument: Option<&str>) -> Result<Command<'_>, CommandError> {
    const EXPECTED: CommandError = CommandError::Syntax("expected RCPT TO:<address>");
    let path_text = argument
        .and_then(|argument| strip_prefix_ignore_case(argument, "TO:"))
        .ok_or(EXPECTED)?;
    let (path, after_path) =
        parse_path(path_text.trim_start_matches(' ')).map_err(CommandError::BadRecipient)?;
    let to = match path {
        Path::Null => return Err(CommandError::BadRecipient("empty recipient")),
        Path::Mailbox(address) => address,
        Path::Postmaster(mailbox) => Address {
            mailbox,
            domain: "",
            utf8: false,
        },
    };
    // No RCPT parameter is supported (we do not offer DSN), so any is unknown.
    if parameters_text(after_path)?
        .split(' ')
        .any(|word| !word.is_empty())
    {
        return Err(CommandError::UnknownParameter);
    }
    Ok(Command::Rcpt {
        to,
        parameters: RcptParameters {},
    })
}

/// What follows the closing `>`: nothing, or parameters after at least one space.
fn parameters_text(after_path: &str) -> Result<&str, CommandError> {
    if after_path.is_empty() || after_path.starts_with(' ') {
        Ok(after_path)
    } else {
        Err(CommandError::Syntax("expected a space after the address"))
    }
}

/// The MAIL parameters we implement (RFC 5321 §4.1.2 `Mail-parameters`).
fn mail_parameters(text: &str) -> Result<MailParameters<'_>, CommandError> {
    let mut parameters = MailParameters::default();
    for parameter in text.split(' ').filter(|word| !word.is_empty()) {
        let (keyword, value) = match parameter.split_once('=') {
            Some((keyword, value)) => (keyword, Some(value)),
            None => (parameter, None),
        };
        if !is_esmtp_keyword(keyword) {
            return Err(CommandError::BadParameter("malformed parameter"));
        }
        if let Some(value) = value
            && !is_esmtp_value(value)
        {
            return Err(CommandError::BadParameter("malformed parameter value"));
        }
        if keyword.eq_ignore_ascii_case("SIZE") {
            if parameters.size_bytes.is_some() {
                return Err(CommandError::BadParameter("SIZE given twice"));
            }
            parameters.size_bytes = Some(size_value(value)?);
        } else if keyword.eq_ignore_ascii_case("BODY") {
            if parameters.body.is_some() {
                return Err(CommandError::BadParameter("BODY given twice"));
            }
            parameters.body = Some(body_value(value)?);
        } else if keyword.eq_ignore_ascii_case("SMTPUTF8") {
            if parameters.smtputf8 {
                return Err(CommandError::BadParameter("SMTPUTF8 given twice"));
            }
            if value.is_some() {
                return Err(CommandError::BadParameter("SMTPUTF8 takes no value"));
            }
            parameters.smtputf8 = true;
        } else if keyword.eq_ignore_ascii_case("AUTH") {
            if parameters.auth.is_some() {
                return Err(CommandError::BadParameter("AUTH given twice"));
            }
            match value {
                Some(value) if is_xtext(value) => parameters.auth = Some(value),
                _ => return Err(CommandError::BadParameter("AUTH needs an xtext value")),
            }
        } else {
            return Err(CommandError::UnknownParameter);
        }
    }
    Ok(parameters)
}

/// RFC 1870 `SIZE=size-value`: decimal digits only (`str::parse` would take a `+`).
fn size_value(value: Option<&str>) -> Result<u64, CommandError> {
    let value = value.ok_or(CommandError::BadParameter("SIZE needs a value"))?;
    if !value.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(CommandError::BadParameter("SIZE is not a number"));
    }
    value
        .parse()
        .map_err(|_| CommandError::BadParameter("SIZE is too large"))
}

/// RFC 6152 `BODY=7BIT|8BITMIME`.
///
/// `BODY=BINARYMIME` (RFC 3030 §3) is a known value that we do not offer (we do not
/// advertise BINARYMIME), so it is a bad value of a known parameter: 501 5.5.4, not the
/// 555 of an unknown parameter, with a text that names it.
fn body_value(value: Option<&str>) -> Result<Body, CommandError> {
    match value {
        Some(value) if value.eq_ignore_ascii_case("7BIT") => Ok(Body::SevenBit),
        Some(value) if value.eq_ignore_ascii_case("8BITMIME") => Ok(Body::EightBitMime),
        Some(value) if value.eq_ignore_ascii_case("BINARYMIME") => Err(CommandError::BadParameter(
            "BODY=BINARYMIME is not supported",
        )),
        Some(_) => Err(CommandError::BadParameter("unknown BODY value")),
        None => Err(CommandError::BadParameter("BODY needs a value")),
    }
}

/// RFC 5321 §4.1.2 `esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")`.
fn is_esmtp_keyword(keyword: &str) -> bool {
    let mut bytes = keyword.bytes();
    bytes
        .next()
        .is_some_and(|first| first.is_ascii_alphanumeric())
        && bytes.all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
}

/// RFC 5321 §4.1.2 `esmtp-value = 1*(%d33-60 / %d62-126)`, with RFC 6531's UTF-8.
/// Spaces and control characters never reach here.
fn is_esmtp_value(value: &str) -> bool {
    !value.is_empty() && !value.contains('=')
}

/// RFC 3461 §4 xtext: printable ASCII except `+` and `=`, and `+` followed by two hex
/// digits (upper case in the RFC; lower case accepted).
fn is_xtext(value: &str) -> bool {
    let mut bytes = value.bytes();
    while let Some(byte) = bytes.next() {
        let valid = match byte {
            b'+' => {
                bytes.next().is_some_and(|digit| digit.is_ascii_hexdigit())
                    && bytes.next().is_some_and(|digit| digit.is_ascii_hexdigit())
            }
            b'=' => false,
            33..=126 => true,
            _ => false,
        };
        if !valid {
            return false;
        }
    }
    true
}

/// `BDAT chunk-size [LAST]` (RFC 3030 §2).
fn parse_bdat(argument: Option<&str>) -> Result<Command<'_>, CommandError> {
    let mut words = argument
        .unwrap_or_default()
        .split(' ')
        .filter(|word| !word.is_empty());
    let size = words
        .next()
        .filter(|size| size.bytes().all(|byte| byte.is_ascii_digit()))
        .ok_or(CommandError::Syntax("BDAT needs a chunk size"))?;
    let chunk_size_bytes = size
        .parse()
        .map_err(|_| CommandError::Syntax("BDAT chunk size is too large"))?;
    let last = match words.next() {
        None => false,
        Some(word) if word.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(CommandError::Syntax("expected BDAT size [LAST]")),
    };
    if words.next().is_some() {
        return Err(CommandError::Syntax("expected BDAT size [LAST]"));
    }
    Ok(Command::Bdat {
        chunk_size_bytes,
        last,
    })
}

/// `AUTH mechanism [initial-response]` (RFC 4954 §4).
fn parse_auth(argument: Option<&str>) -> Result<Command<'_>, CommandError> {
    let mut words = argument
        .unwrap_or_default()
        .split(' ')
        .filter(|word| !word.is_empty());
    let mechanism = words
        .next()
        .ok_or(CommandError::Syntax("AUTH needs a mechanism"))?;
    let initial_response = words.next();
    if words.next().is_some() {
        return Err(CommandError::Syntax(
            "expected AUTH mechanism [initial-response]",
        ));
    }
    Ok(Command::Auth {
        mechanism,
        initial_response,
    })
}

/// A path as written between angle brackets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path<'a> {
    /// `<>`.
    Null,
    /// `<postmaster>` in any case, holding the word as written.
    Postmaster(&'a str),
    Mailbox(Address<'a>),
}

/// Parses `<...>` at the start of `text` (RFC 5321 §4.1.2 `Path`, plus `<>` and
/// `<postmaster>`, which the caller accepts or refuses). Returns the path and the text
/// after `>`. Errors are short details for the reply.
fn parse_path(text: &str) -> Result<(Path<'_>, &str), &'static str> {
    let mut cursor = Cursor { text, position: 0 };
    if !cursor.eat(b'<') {
        return Err("address must be enclosed in <>");
    }
    let path = if cursor.eat(b'>') {
        Path::Null
    } else if let Some(after) = strip_prefix_ignore_case(cursor.rest(), "postmaster>") {
        let mailbox = cursor.rest().get(.."postmaster".len()).unwrap_or_default();
        cursor.position = text.len() - after.len();
        Path::Postmaster(mailbox)
    } else {
        if cursor.peek() == Some(b'@') {
            // RFC 5321 §4.1.2 `A-d-l` and appendix C: a source route is accepted and
            // ignored; the mail goes to the mailbox after the colon.
            source_route(&mut cursor)?;
        }
        let mailbox_start = cursor.position;
        local_part(&mut cursor)?;
        if !cursor.eat(b'@') {
            return Err("missing @domain");
        }
        let domain_start = cursor.position;
        domain(&mut cursor)?;
        let mailbox = cursor.since(mailbox_start);
        let domain = cursor.since(domain_start);
        if !cursor.eat(b'>') {
            return Err("expected > after the address");
        }
        Path::Mailbox(Address {
            mailbox,
            domain,
            utf8: !mailbox.is_ascii(),
        })
    };
    if cursor.position > MAX_PATH_BYTES {
        return Err("address longer than 256 octets");
    }
    Ok((path, cursor.rest()))
}

/// `A-d-l ":"`: `@domain` separated by commas, ending in a colon.
fn source_route(cursor: &mut Cursor<'_>) -> Result<(), &'static str> {
    loop {
        if !cursor.eat(b'@') {
            return Err("malformed source route");
        }
        domain(cursor).map_err(|_| "malformed source route")?;
        if cursor.eat(b':') {
            return Ok(());
        }
        if !cursor.eat(b',') {
            return Err("malformed source route");
        }
    }
}

/// RFC 5321 §4.1.2 `Local-part = Dot-string / Quoted-string`, with RFC 6531's UTF-8.
///
/// A dot-string is accepted with leading, trailing or repeated dots (`a..b`, `a.`):
/// RFC 5322 calls those obsolete, but Japanese mobile carriers issued such addresses for
/// years and they still receive mail. Dots are not delimiters anywhere in SMTP, so
/// accepting them costs nothing.
fn local_part(cursor: &mut Cursor<'_>) -> Result<(), &'static str> {
    let start = cursor.position;
    if cursor.eat(b'"') {
        loop {
            match cursor.peek() {
                None => return Err("unterminated quoted local part"),
                Some(b'"') => {
                    cursor.bump();
                    break;
                }
                // quoted-pairSMTP = %d92 %d32-126
                Some(b'\\') => {
                    cursor.bump();
                    match cursor.peek() {
                        Some(32..=126) => cursor.bump(),
                        _ => return Err("malformed quoted pair in local part"),
                    }
                }
                // qtextSMTP = %d32-33 / %d35-91 / %d93-126 / UTF8-non-ascii
                Some(32..=126 | 128..) => cursor.bump(),
                Some(_) => return Err("invalid character in quoted local part"),
            }
        }
    } else {
        while cursor
            .peek()
            .is_some_and(|byte| is_atext(byte) || byte == b'.')
        {
            cursor.bump();
        }
        if cursor.position == start {
            return Err("empty or malformed local part");
        }
    }
    if cursor.position - start > MAX_LOCAL_PART_BYTES {
        return Err("local part longer than 64 octets");
    }
    Ok(())
}

/// RFC 5321 §4.1.2 `atext` (RFC 5322 §3.2.3) plus RFC 6531's UTF8-non-ascii.
fn is_atext(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&byte) || byte >= 0x80
}

/// RFC 5321 §4.1.2 `Domain / address-literal`.
fn domain(cursor: &mut Cursor<'_>) -> Result<(), &'static str> {
    let start = cursor.position;
    if cursor.peek() == Some(b'[') {
        address_literal(cursor)?;
    } else {
        loop {
            let label_start = cursor.position;
            while cursor
                .peek()
                .is_some_and(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte >= 0x80)
            {
                cursor.bump();
            }
            let label = cursor.since(label_start);
            if label.is_empty() {
                return Err("empty or malformed domain");
            }
            // sub-domain = Let-dig [Ldh-str]: no hyphen at either end.
            if label.starts_with('-') || label.ends_with('-') {
                return Err("domain label starts or ends with a hyphen");
            }
            if label.len() > MAX_DOMAIN_LABEL_BYTES {
                return Err("domain label longer than 63 octets");
            }
            if !cursor.eat(b'.') {
                break;
            }
        }
    }
    if cursor.position - start > MAX_DOMAIN_BYTES {
        return Err("domain longer than 255 octets");
    }
    Ok(())
}

/// RFC 5321 §4.1.3: `[IPv4]`, `[IPv6:...]` or `[tag:content]`.
fn address_literal(cursor: &mut Cursor<'_>) -> Result<(), &'static str> {
    const MALFORMED: &str = "malformed address literal";
    if !cursor.eat(b'[') {
        return Err(MALFORMED);
    }
    let start = cursor.position;
    // dcontent = %d33-90 / %d94-126: printable ASCII except `[`, `\` and `]`.
    while cursor
        .peek()
        .is_some_and(|byte| matches!(byte, 33..=90 | 94..=126))
    {
        cursor.bump();
    }
    let literal = cursor.since(start);
    if !cursor.eat(b']') {
        return Err(MALFORMED);
    }
    let valid = if let Some(ipv6) = strip_prefix_ignore_case(literal, "IPv6:") {
        ipv6.parse::<std::net::Ipv6Addr>().is_ok()
    } else if let Some((tag, content)) = literal.split_once(':') {
        // General-address-literal = Standardized-tag ":" 1*dcontent
        is_esmtp_keyword(tag) && !tag.ends_with('-') && !content.is_empty()
    } else {
        literal.parse::<std::net::Ipv4Addr>().is_ok()
    };
    if valid { Ok(()) } else { Err(MALFORMED) }
}

/// A bounds-checked position in a path being parsed. The parser steps over a non-ASCII
/// character's bytes all at once (they are all >= 0x80 and accepted together), so it
/// only takes slices where it stopped at an ASCII byte or the end: on a UTF-8 character
/// boundary. `get` makes even a mistake there an empty slice, never a panic.
struct Cursor<'a> {
    text: &'a str,
    /// Invariant: `<= text.len()`.
    position: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.position).copied()
    }

    /// Moves past the byte `peek` returned; only called after a `Some` from `peek`.
    fn bump(&mut self) {
        self.position = (self.position + 1).min(self.text.len());
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.peek() == Some(byte);
        if found {
            self.bump();
        }
        found
    }

    fn rest(&self) -> &'a str {
        self.text.get(self.position..).unwrap_or_default()
    }

    fn since(&self, start: usize) -> &'a str {
        self.text.get(start..self.position).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address<'a>(mailbox: &'a str, domain: &'a str) -> Address<'a> {
        Address {
            mailbox,
            domain,
            utf8: !mailbox.is_ascii(),
        }
    }

    fn mail(from: ReversePath<'_>) -> Command<'_> {
        Command::Mail {
            from,
            parameters: MailParameters::default(),
        }
    }

    fn mail_from<'a>(mailbox: &'a str, domain: &'a str) -> Command<'a> {
        mail(ReversePath::Mailbox(address(mailbox, domain)))
    }

    fn mail_with(parameters: MailParameters<'_>) -> Command<'_> {
        Command::Mail {
            from: ReversePath::Mailbox(address("a@example.com", "example.com")),
            parameters,
        }
    }

    fn rcpt<'a>(mailbox: &'a str, domain: &'a str) -> Command<'a> {
        Command::Rcpt {
            to: address(mailbox, domain),
            parameters: RcptParameters {},
        }
    }

    fn check(cases: &[(&str, &[u8], Result<Command<'_>, CommandError>)]) {
        for (name, line, expected) in cases {
            assert_eq!(&parse_command(line), expected, "{name}");
        }
    }

    #[test]
    fn simple_verbs() {
        use CommandError::*;
        check(&[
            ("data", b"DATA", Ok(Command::Data)),
            ("data lower case", b"data", Ok(Command::Data)),
            ("data mixed case", b"DaTa", Ok(Command::Data)),
            ("data trailing spaces", b"DATA  ", Ok(Command::Data)),
            (
                "data with argument",
                b"DATA x",
                Err(Syntax("DATA takes no argument")),
            ),
            ("rset", b"RSET", Ok(Command::Rset)),
            (
                "rset with argument",
                b"RSET x",
                Err(Syntax("RSET takes no argument")),
            ),
            ("quit", b"quit", Ok(Command::Quit)),
            (
                "quit with argument",
                b"QUIT now",
                Err(Syntax("QUIT takes no argument")),
            ),
            ("starttls", b"STARTTLS", Ok(Command::StartTls)),
            ("starttls lower case", b"starttls", Ok(Command::StartTls)),
            (
                "starttls with argument",
                b"STARTTLS x",
                Err(Syntax("STARTTLS takes no argument")),
            ),
            ("noop", b"NOOP", Ok(Command::Noop)),
            (
                "noop with argument",
                b"NOOP anything at all",
                Ok(Command::Noop),
            ),
            (
                "vrfy",
                b"VRFY postmaster",
                Ok(Command::Vrfy {
                    argument: "postmaster",
                }),
            ),
            (
                "vrfy without argument",
                b"VRFY",
                Err(Syntax("VRFY needs an argument")),
            ),
            (
                "expn",
                b"EXPN staff list",
                Ok(Command::Expn {
                    argument: "staff list",
                }),
            ),
            (
                "expn without argument",
                b"EXPN ",
                Err(Syntax("EXPN needs an argument")),
            ),
            ("help", b"HELP", Ok(Command::Help { topic: None })),
            (
                "help topic",
                b"help MAIL",
                Ok(Command::Help {
                    topic: Some("MAIL"),
                }),
            ),
        ]);
    }

    #[test]
    fn unknown_and_malformed_lines() {
        use CommandError::*;
        check(&[
            ("empty line", b"", Err(UnknownCommand)),
            ("unknown verb", b"XYZZY", Err(UnknownCommand)),
            ("leading space", b" DATA", Err(UnknownCommand)),
            ("verb prefix", b"DAT", Err(UnknownCommand)),
            ("verb with suffix", b"DATAX", Err(UnknownCommand)),
            ("tab after verb", b"EHLO\tx", Err(UnknownCommand)),
            ("http request", b"GET / HTTP/1.1", Err(UnknownCommand)),
            ("unknown verb not utf-8", b"\xff\xfe", Err(UnknownCommand)),
            ("argument not utf-8", b"EHLO \xff", Err(NotUtf8)),
            ("truncated utf-8", b"EHLO \xe3\x81", Err(NotUtf8)),
            (
                "bare cr in line",
                b"MAIL FROM:<a@b>\rRCPT TO:<c@d>",
                Err(Syntax("control character in command line")),
            ),
            (
                "nul in line",
                b"NOOP \0",
                Err(Syntax("control character in command line")),
            ),
        ]);
    }

    #[test]
    fn greetings() {
        use CommandError::*;
        check(&[
            (
                "ehlo",
                b"EHLO mail.example.com",
                Ok(Command::Ehlo {
                    domain: "mail.example.com",
                }),
            ),
            (
                "ehlo lower case",
                b"ehlo x",
                Ok(Command::Ehlo { domain: "x" }),
            ),
            (
                "ehlo literal",
                b"EHLO [192.0.2.1]",
                Ok(Command::Ehlo {
                    domain: "[192.0.2.1]",
                }),
            ),
            (
                "ehlo extra words ignored",
                b"EHLO my printer",
                Ok(Command::Ehlo { domain: "my" }),
            ),
            (
                "ehlo extra spaces",
                b"EHLO   host  ",
                Ok(Command::Ehlo { domain: "host" }),
            ),
            (
                "ehlo utf-8",
                "EHLO 例え.jp".as_bytes(),
                Ok(Command::Ehlo {
                    domain: "例え.jp"
                }),
            ),
            (
                "ehlo without domain",
                b"EHLO",
                Err(Syntax("EHLO needs a domain")),
            ),
            (
                "ehlo with only spaces",
                b"EHLO   ",
                Err(Syntax("EHLO needs a domain")),
            ),
            (
                "helo",
                b"HELO printer_3f",
                Ok(Command::Helo {
                    domain: "printer_3f",
                }),
            ),
            (
                "helo without domain",
                b"helo",
                Err(Syntax("HELO needs a domain")),
            ),
        ]);
    }

    #[test]
    fn mail_paths() {
        use CommandError::*;
        let long_local = format!("MAIL FROM:<{}@example.com>", "a".repeat(65));
        let max_local = format!("MAIL FROM:<{}@example.com>", "a".repeat(64));
        let long_label = format!("MAIL FROM:<a@{}.com>", "b".repeat(64));
        // "<" + "a@" + 252-octet domain + ">" = 256 octets: the longest path allowed.
        let max_path = format!("MAIL FROM:<a@bbbb.{}com>", "bbb.".repeat(61));
        let max_path_domain = max_path.get(13..max_path.len() - 1).unwrap_or_default();
        // "<" + "aaa@" + 251-octet domain + ">" = 257 octets.
        let long_path = format!("MAIL FROM:<aaa@{}com>", "bbb.".repeat(62));
        check(&[
            (
                "plain",
                b"MAIL FROM:<a@example.com>",
                Ok(mail_from("a@example.com", "example.com")),
            ),
            (
                "lower case",
                b"mail from:<a@example.com>",
                Ok(mail_from("a@example.com", "example.com")),
            ),
            (
                "space after colon",
                b"MAIL FROM: <a@example.com>",
                Ok(mail_from("a@example.com", "example.com")),
            ),
            (
                "trailing spaces",
                b"MAIL FROM:<a@example.com>  ",
                Ok(mail_from("a@example.com", "example.com")),
            ),
            (
                "null reverse path",
                b"MAIL FROM:<>",
                Ok(mail(ReversePath::Null)),
            ),
            (
                "null reverse path with space",
                b"MAIL FROM: <>",
                Ok(mail(ReversePath::Null)),
            ),
            (
                "quoted local part",
                br#"MAIL FROM:<"john doe"@example.com>"#,
                Ok(mail_from(r#""john doe"@example.com"#, "example.com")),
            ),
            (
                "quoted pair",
                br#"MAIL FROM:<"a\"b\\c"@example.com>"#,
                Ok(mail_from(r#""a\"b\\c"@example.com"#, "example.com")),
            ),
            (
                "quoted local part holding > and @",
                br#"MAIL FROM:<"a>b@c"@example.com>"#,
                Ok(mail_from(r#""a>b@c"@example.com"#, "example.com")),
            ),
            (
                "empty quoted local part",
                br#"MAIL FROM:<""@example.com>"#,
                Ok(mail_from(r#"""@example.com"#, "example.com")),
            ),
            (
                "atext specials",
                b"MAIL FROM:<a+b!#$%&'*/=?^_`{|}~-@example.com>",
                Ok(mail_from(
                    "a+b!#$%&'*/=?^_`{|}~-@example.com",
                    "example.com",
                )),
            ),
            (
                "repeated and trailing dots",
                b"MAIL FROM:<a..b.@docomo.ne.jp>",
                Ok(mail_from("a..b.@docomo.ne.jp", "docomo.ne.jp")),
            ),
            (
                "ipv4 literal",
                b"MAIL FROM:<a@[192.0.2.1]>",
                Ok(mail_from("a@[192.0.2.1]", "[192.0.2.1]")),
            ),
            (
                "ipv6 literal",
                b"MAIL FROM:<a@[IPv6:2001:db8::1]>",
                Ok(mail_from("a@[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]")),
            ),
            (
                "ipv6 literal lower-case tag",
                b"MAIL FROM:<a@[ipv6:::1]>",
                Ok(mail_from("a@[ipv6:::1]", "[ipv6:::1]")),
            ),
            (
                "ipv4-mapped ipv6 literal",
                b"MAIL FROM:<a@[IPv6:::ffff:192.0.2.1]>",
                Ok(mail_from(
                    "a@[IPv6:::ffff:192.0.2.1]",
                    "[IPv6:::ffff:192.0.2.1]",
                )),
            ),
            (
                "general literal",
                b"MAIL FROM:<a@[x-tag:stuff]>",
                Ok(mail_from("a@[x-tag:stuff]", "[x-tag:stuff]")),
            ),
            (
                "utf-8 local part",
                "MAIL FROM:<ユーザー@example.jp>".as_bytes(),
                Ok(mail_from("ユーザー@example.jp", "example.jp")),
            ),
            (
                "utf-8 domain",
                "MAIL FROM:<a@例え.テスト>".as_bytes(),
                Ok(mail_from("a@例え.テスト", "例え.テスト")),
            ),
            (
                "source route",
                b"MAIL FROM:<@a.example,@b.example:user@d.example>",
                Ok(mail_from("user@d.example", "d.example")),
            ),
            (
                "one-hop source route",
                b"MAIL FROM:<@a.example:user@d.example>",
                Ok(mail_from("user@d.example", "d.example")),
            ),
            (
                "local part at the limit",
                max_local.as_bytes(),
                Ok(mail_from(
                    max_local.get(11..max_local.len() - 1).unwrap_or_default(),
                    "example.com",
                )),
            ),
            (
                "path at the limit",
                max_path.as_bytes(),
                Ok(mail_from(
                    max_path.get(11..max_path.len() - 1).unwrap_or_default(),
                    max_path_domain,
                )),
            ),
            (
                "local part over the limit",
                long_local.as_bytes(),
                Err(BadSender("local part longer than 64 octets")),
            ),
            (
                "label over the limit",
                long_label.as_bytes(),
                Err(BadSender("domain label longer than 63 octets")),
            ),
            (
                "path over the limit",
                long_path.as_bytes(),
                Err(BadSender("address longer than 256 octets")),
            ),
            (
                "postmaster is not a sender",
                b"MAIL FROM:<postmaster>",
                Err(BadSender("postmaster without a domain is only a recipient")),
            ),
            (
                "no brackets",
                b"MAIL FROM:a@example.com",
                Err(BadSender("address must be enclosed in <>")),
            ),
            (
                "no closing bracket",
                b"MAIL FROM:<a@example.com",
                Err(BadSender("expected > after the address")),
            ),
            (
                "no domain",
                b"MAIL FROM:<a>",
                Err(BadSender("missing @domain")),
            ),
            (
                "empty domain",
                b"MAIL FROM:<a@>",
                Err(BadSender("empty or malformed domain")),
            ),
            (
                "empty local part",
                b"MAIL FROM:<@example.com>",
                Err(BadSender("malformed source route")),
            ),
            (
                "trailing dot in domain",
                b"MAIL FROM:<a@example.com.>",
                Err(BadSender("empty or malformed domain")),
            ),
            (
                "double dot in domain",
                b"MAIL FROM:<a@example..com>",
                Err(BadSender("empty or malformed domain")),
            ),
            (
                "hyphen at label start",
                b"MAIL FROM:<a@-example.com>",
                Err(BadSender("domain label starts or ends with a hyphen")),
            ),
            (
                "underscore in domain",
                b"MAIL FROM:<a@ex_ample.com>",
                Err(BadSender("expected > after the address")),
            ),
            (
                "space in local part",
                b"MAIL FROM:<a b@example.com>",
                Err(BadSender("missing @domain")),
            ),
            (
                "unterminated quote",
                br#"MAIL FROM:<"ab@example.com>"#,
                Err(BadSender("unterminated quoted local part")),
            ),
            (
                "bad ipv4 literal",
                b"MAIL FROM:<a@[192.0.2.300]>",
                Err(BadSender("malformed address literal")),
            ),
            (
                "bad ipv6 literal",
                b"MAIL FROM:<a@[IPv6:zz::1]>",
                Err(BadSender("malformed address literal")),
            ),
            (
                "unclosed literal",
                b"MAIL FROM:<a@[192.0.2.1>",
                Err(BadSender("malformed address literal")),
            ),
            (
                "bad source route",
                b"MAIL FROM:<@a.example;user@d.example>",
                Err(BadSender("malformed source route")),
            ),
            (
                "text after path",
                b"MAIL FROM:<a@example.com>x",
                Err(Syntax("expected a space after the address")),
            ),
            (
                "missing from",
                b"MAIL <a@example.com>",
                Err(Syntax("expected MAIL FROM:<address>")),
            ),
            (
                "missing argument",
                b"MAIL",
                Err(Syntax("expected MAIL FROM:<address>")),
            ),
            (
                "to instead of from",
                b"MAIL TO:<a@example.com>",
                Err(Syntax("expected MAIL FROM:<address>")),
            ),
            (
                "empty path",
                b"MAIL FROM:",
                Err(BadSender("address must be enclosed in <>")),
            ),
        ]);
    }

    #[test]
    fn mail_parameters() {
        use CommandError::*;
        let defaults = MailParameters::default();
        check(&[
            (
                "size",
                b"MAIL FROM:<a@example.com> SIZE=1000",
                Ok(mail_with(MailParameters {
                    size_bytes: Some(1000),
                    ..defaults
                })),
            ),
            (
                "size zero",
                b"MAIL FROM:<a@example.com> SIZE=0",
                Ok(mail_with(MailParameters {
                    size_bytes: Some(0),
                    ..defaults
                })),
            ),
            (
                "size max",
                b"MAIL FROM:<a@example.com> SIZE=18446744073709551615",
                Ok(mail_with(MailParameters {
                    size_bytes: Some(u64::MAX),
                    ..defaults
                })),
            ),
            (
                "size overflow",
                b"MAIL FROM:<a@example.com> SIZE=18446744073709551616",
                Err(BadParameter("SIZE is too large")),
            ),
            (
                "size with sign",
                b"MAIL FROM:<a@example.com> SIZE=+1",
                Err(BadParameter("SIZE is not a number")),
            ),
            (
                "size not a number",
                b"MAIL FROM:<a@example.com> SIZE=big",
                Err(BadParameter("SIZE is not a number")),
            ),
            (
                "size without value",
                b"MAIL FROM:<a@example.com> SIZE",
                Err(BadParameter("SIZE needs a value")),
            ),
            (
                "size empty value",
                b"MAIL FROM:<a@example.com> SIZE=",
                Err(BadParameter("malformed parameter value")),
            ),
            (
                "size twice",
                b"MAIL FROM:<a@example.com> SIZE=1 SIZE=2",
                Err(BadParameter("SIZE given twice")),
            ),
            (
                "size lower case",
                b"MAIL FROM:<a@example.com> size=5",
                Ok(mail_with(MailParameters {
                    size_bytes: Some(5),
                    ..defaults
                })),
            ),
            (
                "body 7bit",
                b"MAIL FROM:<a@example.com> BODY=7BIT",
                Ok(mail_with(MailParameters {
                    body: Some(Body::SevenBit),
                    ..defaults
                })),
            ),
            (
                "body 8bitmime",
                b"MAIL FROM:<a@example.com> BODY=8BITMIME",
                Ok(mail_with(MailParameters {
                    body: Some(Body::EightBitMime),
                    ..defaults
                })),
            ),
            (
                "body lower case",
                b"MAIL FROM:<a@example.com> body=8bitmime",
                Ok(mail_with(MailParameters {
                    body: Some(Body::EightBitMime),
                    ..defaults
                })),
            ),
            (
                "body binarymime",
                b"MAIL FROM:<a@example.com> BODY=BINARYMIME",
                Err(BadParameter("BODY=BINARYMIME is not supported")),
            ),
            (
                "body unknown",
                b"MAIL FROM:<a@example.com> BODY=9BIT",
                Err(BadParameter("unknown BODY value")),
            ),
            (
                "body without value",
                b"MAIL FROM:<a@example.com> BODY",
                Err(BadParameter("BODY needs a value")),
            ),
            (
                "body twice",
                b"MAIL FROM:<a@example.com> BODY=7BIT BODY=8BITMIME",
                Err(BadParameter("BODY given twice")),
            ),
            (
                "smtputf8",
                b"MAIL FROM:<a@example.com> SMTPUTF8",
                Ok(mail_with(MailParameters {
                    smtputf8: true,
                    ..defaults
                })),
            ),
            (
                "smtputf8 with value",
                b"MAIL FROM:<a@example.com> SMTPUTF8=yes",
                Err(BadParameter("SMTPUTF8 takes no value")),
            ),
            (
                "smtputf8 twice",
                b"MAIL FROM:<a@example.com> SMTPUTF8 smtputf8",
                Err(BadParameter("SMTPUTF8 given twice")),
            ),
            (
                "auth",
                b"MAIL FROM:<a@example.com> AUTH=e+3Dmc2@example.com",
                Ok(mail_with(MailParameters {
                    auth: Some("e+3Dmc2@example.com"),
                    ..defaults
                })),
            ),
            (
                "auth empty mailbox",
                b"MAIL FROM:<a@example.com> AUTH=<>",
                Ok(mail_with(MailParameters {
                    auth: Some("<>"),
                    ..defaults
                })),
            ),
            (
                "auth bad xtext",
                b"MAIL FROM:<a@example.com> AUTH=a+zz",
                Err(BadParameter("AUTH needs an xtext value")),
            ),
            (
                "auth truncated hexchar",
                b"MAIL FROM:<a@example.com> AUTH=a+4",
                Err(BadParameter("AUTH needs an xtext value")),
            ),
            (
                "auth without value",
                b"MAIL FROM:<a@example.com> AUTH",
                Err(BadParameter("AUTH needs an xtext value")),
            ),
            (
                "auth twice",
                b"MAIL FROM:<a@example.com> AUTH=<> AUTH=<>",
                Err(BadParameter("AUTH given twice")),
            ),
            (
                "all together, extra spaces",
                b"MAIL FROM:<a@example.com>  SIZE=12345 BODY=8BITMIME  SMTPUTF8 AUTH=<> ",
                Ok(mail_with(MailParameters {
                    size_bytes: Some(12345),
                    body: Some(Body::EightBitMime),
                    smtputf8: true,
                    auth: Some("<>"),
                })),
            ),
            (
                "unknown parameter",
                b"MAIL FROM:<a@example.com> RET=HDRS",
                Err(UnknownParameter),
            ),
            (
                "unknown flag",
                b"MAIL FROM:<a@example.com> XYZZY",
                Err(UnknownParameter),
            ),
            (
                "malformed keyword",
                b"MAIL FROM:<a@example.com> =1",
                Err(BadParameter("malformed parameter")),
            ),
            (
                "keyword with underscore",
                b"MAIL FROM:<a@example.com> SI_ZE=1",
                Err(BadParameter("malformed parameter")),
            ),
            (
                "value with equals",
                b"MAIL FROM:<a@example.com> SIZE=1=2",
                Err(BadParameter("malformed parameter value")),
            ),
            (
                "null path with parameters",
                b"MAIL FROM:<> SIZE=10",
                Ok(Command::Mail {
                    from: ReversePath::Null,
                    parameters: MailParameters {
                        size_bytes: Some(10),
                        ..defaults
                    },
                }),
            ),
        ]);
    }

    #[test]
    fn rcpt_paths_and_parameters() {
        use CommandError::*;
        check(&[
            (
                "plain",
                b"RCPT TO:<b@example.org>",
                Ok(rcpt("b@example.org", "example.org")),
            ),
            (
                "lower case",
                b"rcpt to:<b@example.org>",
                Ok(rcpt("b@example.org", "example.org")),
            ),
            (
                "space after colon",
                b"RCPT TO: <b@example.org>",
                Ok(rcpt("b@example.org", "example.org")),
            ),
            (
                "postmaster",
                b"RCPT TO:<postmaster>",
                Ok(rcpt("postmaster", "")),
            ),
            (
                "postmaster any case",
                b"RCPT TO:<PostMaster>",
                Ok(rcpt("PostMaster", "")),
            ),
            (
                "postmaster at domain",
                b"RCPT TO:<Postmaster@example.org>",
                Ok(rcpt("Postmaster@example.org", "example.org")),
            ),
            (
                "source route",
                b"RCPT TO:<@relay.example:b@example.org>",
                Ok(rcpt("b@example.org", "example.org")),
            ),
            (
                "utf-8",
                "RCPT TO:<δοκιμή@παράδειγμα.δοκιμή>".as_bytes(),
                Ok(rcpt("δοκιμή@παράδειγμα.δοκιμή", "παράδειγμα.δοκιμή")),
            ),
            (
                "null path",
                b"RCPT TO:<>",
                Err(BadRecipient("empty recipient")),
            ),
            (
                "no brackets",
                b"RCPT TO:b@example.org",
                Err(BadRecipient("address must be enclosed in <>")),
            ),
            (
                "postmaster with text after",
                b"RCPT TO:<postmasterx>",
                Err(BadRecipient("missing @domain")),
            ),
            (
                "parameter",
                b"RCPT TO:<b@example.org> NOTIFY=NEVER",
                Err(UnknownParameter),
            ),
            (
                "malformed parameter",
                b"RCPT TO:<b@example.org> =",
                Err(UnknownParameter),
            ),
            (
                "trailing spaces",
                b"RCPT TO:<b@example.org>   ",
                Ok(rcpt("b@example.org", "example.org")),
            ),
            (
                "missing to",
                b"RCPT <b@example.org>",
                Err(Syntax("expected RCPT TO:<address>")),
            ),
            (
                "from instead of to",
                b"RCPT FROM:<b@example.org>",
                Err(Syntax("expected RCPT TO:<address>")),
            ),
        ]);
    }

    #[test]
    fn utf8_flag() {
        let Ok(Command::Rcpt { to, .. }) = parse_command("RCPT TO:<ü@example.org>".as_bytes())
        else {
            panic!("should parse");
        };
        assert!(to.utf8);
        let Ok(Command::Rcpt { to, .. }) = parse_command(b"RCPT TO:<u@example.org>") else {
            panic!("should parse");
        };
        assert!(!to.utf8);
    }

    #[test]
    fn bdat_and_auth() {
        use CommandError::*;
        check(&[
            (
                "bdat",
                b"BDAT 1000",
                Ok(Command::Bdat {
                    chunk_size_bytes: 1000,
                    last: false,
                }),
            ),
            (
                "bdat last",
                b"BDAT 0 LAST",
                Ok(Command::Bdat {
                    chunk_size_bytes: 0,
                    last: true,
                }),
            ),
            (
                "bdat last lower case",
                b"bdat 12 last",
                Ok(Command::Bdat {
                    chunk_size_bytes: 12,
                    last: true,
                }),
            ),
            (
                "bdat max",
                b"BDAT 18446744073709551615",
                Ok(Command::Bdat {
                    chunk_size_bytes: u64::MAX,
                    last: false,
                }),
            ),
            (
                "bdat overflow",
                b"BDAT 18446744073709551616",
                Err(Syntax("BDAT chunk size is too large")),
            ),
            (
                "bdat without size",
                b"BDAT",
                Err(Syntax("BDAT needs a chunk size")),
            ),
            (
                "bdat negative",
                b"BDAT -1",
                Err(Syntax("BDAT needs a chunk size")),
            ),
            (
                "bdat plus sign",
                b"BDAT +1",
                Err(Syntax("BDAT needs a chunk size")),
            ),
            (
                "bdat only last",
                b"BDAT LAST",
                Err(Syntax("BDAT needs a chunk size")),
            ),
            (
                "bdat bad flag",
                b"BDAT 5 FIRST",
                Err(Syntax("expected BDAT size [LAST]")),
            ),
            (
                "bdat extra word",
                b"BDAT 5 LAST x",
                Err(Syntax("expected BDAT size [LAST]")),
            ),
            (
                "auth",
                b"AUTH LOGIN",
                Ok(Command::Auth {
                    mechanism: "LOGIN",
                    initial_response: None,
                }),
            ),
            (
                "auth initial response",
                b"AUTH PLAIN AGFsaWNlAHNlY3JldA==",
                Ok(Command::Auth {
                    mechanism: "PLAIN",
                    initial_response: Some("AGFsaWNlAHNlY3JldA=="),
                }),
            ),
            (
                "auth empty initial response",
                b"auth plain =",
                Ok(Command::Auth {
                    mechanism: "plain",
                    initial_response: Some("="),
                }),
            ),
            (
                "auth without mechanism",
                b"AUTH",
                Err(Syntax("AUTH needs a mechanism")),
            ),
            (
                "auth extra word",
                b"AUTH PLAIN a b",
                Err(Syntax("expected AUTH mechanism [initial-response]")),
            ),
        ]);
    }

    #[test]
    fn error_replies() {
        let cases: &[(CommandError, &str)] = &[
            (
                CommandError::UnknownCommand,
                "500 5.5.1 Command not recognised\r\n",
            ),
            (
                CommandError::Syntax("DATA takes no argument"),
                "501 5.5.2 Syntax error: DATA takes no argument\r\n",
            ),
            (
                CommandError::BadSender("missing @domain"),
                "501 5.1.7 Bad sender address: missing @domain\r\n",
            ),
            (
                CommandError::BadRecipient("empty recipient"),
                "501 5.1.3 Bad recipient address: empty recipient\r\n",
            ),
            (
                CommandError::UnknownParameter,
                "555 5.5.4 Parameter not recognised or not implemented\r\n",
            ),
            (
                CommandError::BadParameter("SIZE is too large"),
                "501 5.5.4 Bad parameter: SIZE is too large\r\n",
            ),
            (
                CommandError::NotUtf8,
                "501 5.5.2 Command line is not valid UTF-8\r\n",
            ),
        ];
        for (error, expected) in cases {
            let mut out = Vec::new();
            error.reply().write_to(&mut out);
            assert_eq!(String::from_utf8_lossy(&out), *expected, "{error:?}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn never_panics_on_arbitrary_bytes(line in proptest::collection::vec(any::<u8>(), 0..300)) {
                let _ = parse_command(&line);
            }

            #[test]
            fn never_panics_on_near_miss_commands(
                verb in prop::sample::select(vec!["MAIL FROM:", "RCPT TO:", "EHLO ", "BDAT ", "AUTH ", "mail from: "]),
                rest in "[<>@\\\"\\[\\]:,.a-zA-Z0-9 =+é-]{0,80}",
            ) {
                let line = format!("{verb}{rest}");
                let _ = parse_command(line.as_bytes());
            }

            #[test]
            fn parsed_addresses_borrow_the_domain_from_the_mailbox(
                local in "[a-z0-9.+]{1,20}",
                domain in "[a-z0-9]{1,10}(\\.[a-z0-9]{1,10}){0,3}",
            ) {
                let line = format!("RCPT TO:<{local}@{domain}>");
                let parsed = parse_command(line.as_bytes());
                let expected_mailbox = format!("{local}@{domain}");
                prop_assert_eq!(parsed, Ok(rcpt(&expected_mailbox, &domain)));
            }
        }
    }
}
