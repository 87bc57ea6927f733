//! The server side of SMTP AUTH (RFC 4954) with the PLAIN (RFC 4616) and LOGIN
//! mechanisms, as functions over bytes.
//!
//! The session parses `AUTH mechanism [initial-response]` with
//! [`parse_command`](crate::parse_command), turns the mechanism into a [`Mechanism`]
//! with [`Mechanism::parse`], and then drives a [`ServerExchange`]:
//!
//! ```
//! use tsubame_smtp_proto::sasl::{Mechanism, ServerExchange, Step, write_challenge};
//!
//! let mechanism = Mechanism::parse(b"login").expect("known mechanism");
//! let (mut exchange, step) = ServerExchange::start(mechanism, None);
//! let mut out = Vec::new();
//! if let Step::Challenge(challenge) = step {
//!     write_challenge(challenge, &mut out);
//! }
//! assert_eq!(out, b"334 VXNlcm5hbWU6\r\n");
//! assert!(matches!(exchange.on_line(b"dXNlcg=="), Step::Challenge(b"UGFzc3dvcmQ6")));
//! match exchange.on_line(b"c2VjcmV0") {
//!     Step::Done(credentials) => {
//!         assert_eq!(credentials.username, "user");
//!         assert_eq!(credentials.password().expose(), b"secret");
//!     }
//!     other => panic!("unexpected {other:?}"),
//! }
//! ```
//!
//! Nothing here checks a password, reads a clock or counts attempts: the caller owns
//! the account store, the failed-attempt limits and the rule that AUTH needs TLS.
//!
//! # Replies
//!
//! The errors of this module carry their own reply ([`Failure::reply`],
//! [`UnknownMechanism::reply`]). The replies the session decides on itself are, from
//! RFC 4954 §4 and §6 and RFC 3463:
//!
//! | situation | reply |
//! |---|---|
//! | credentials accepted | `235 2.7.0 Authentication succeeded` |
//! | wrong credentials, or an [`Credentials::authzid`] the caller will not allow | `535 5.7.8 Authentication credentials invalid` |
//! | AUTH before TLS where TLS is required | `538 5.7.11 Encryption required for requested authentication mechanism` |
//! | the account store is unavailable | `454 4.7.0 Temporary authentication failure` |
//! | AUTH after a successful AUTH, or during a mail transaction (RFC 4954 §4) | `503 5.5.1 Already authenticated` / `503 5.5.1 Bad sequence of commands` |
//! | MAIL without AUTH where AUTH is required | `530 5.7.0 Authentication required` |
//!
//! Refusing a foreign authzid with the same 535 as a wrong password keeps the reply
//! from telling a guesser whether the password was right.
//!
//! # Secrets
//!
//! The password lives in a [`Password`] whose `Debug` prints `***` and whose buffer is
//! overwritten with zeros when it is dropped; the decoded PLAIN message, which holds the
//! password too, is wiped the same way. See [`Password`] for what this does not cover.

use crate::reply::{EnhancedCode, Reply};

/// Longest AUTH command line and longest response line, in octets, CRLF included
/// (RFC 4954 §4: 12,288 octets, up from RFC 5321's 512, so that an initial response
/// fits on the command line).
pub const MAX_AUTH_LINE_BYTES: usize = 12_288;

/// Longest response line [`ServerExchange::on_line`] takes, in octets, without its CRLF:
/// [`MAX_AUTH_LINE_BYTES`] minus the two octets of the terminator. Longer lines are
/// [`Failure::TooLong`].
pub const MAX_RESPONSE_BYTES: usize = MAX_AUTH_LINE_BYTES - 2;

/// Longest base64 text [`decode_base64`] accepts, in octets: a whole response line.
/// The decoded output is at most three quarters of this (9,214 octets), so nothing a
/// peer sends can make the decoder allocate more.
pub const MAX_BASE64_INPUT_BYTES: usize = MAX_RESPONSE_BYTES;

/// Longest authorization identity, authentication identity and password, in octets
/// (RFC 4616 §2: a server "MUST accept up to 255 octets" for each). We accept exactly
/// that and no more: no account of ours needs a longer name or password, and the same
/// bound applies to LOGIN's user name and password, which no RFC specifies.
pub const MAX_FIELD_BYTES: usize = 255;

/// LOGIN's first challenge: base64 of `Username:`.
const LOGIN_USERNAME_CHALLENGE: &[u8] = b"VXNlcm5hbWU6";
/// LOGIN's second challenge: base64 of `Password:`.
const LOGIN_PASSWORD_CHALLENGE: &[u8] = b"UGFzc3dvcmQ6";
/// The empty challenge PLAIN sends when the client gave no initial response
/// (RFC 4954 §4, RFC 4422 §5: the client's answer to it is its initial response).
const EMPTY_CHALLENGE: &[u8] = b"";

/// A SASL mechanism we offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 4616.
    Plain,
    /// The LOGIN mechanism (draft-murchison-sasl-login; no RFC), still what many
    /// clients try first.
    Login,
}

impl Mechanism {
    /// The mechanism named by AUTH's first argument, in any case (RFC 4422 §3.1:
    /// mechanism names are upper case, and RFC 4954 §4 matches them case-insensitively
    /// like every SMTP keyword).
    pub fn parse(name: &[u8]) -> Result<Self, UnknownMechanism> {
        if name.eq_ignore_ascii_case(b"PLAIN") {
            Ok(Self::Plain)
        } else if name.eq_ignore_ascii_case(b"LOGIN") {
            Ok(Self::Login)
        } else {
            Err(UnknownMechanism)
        }
    }

    /// The name as advertised in the EHLO `AUTH` line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::Login => "LOGIN",
        }
    }
}

/// AUTH named a mechanism we do not offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unrecognised authentication mechanism")]
pub struct UnknownMechanism;

impl UnknownMechanism {
    /// RFC 4954 §4: "504 5.5.4" for a mechanism the server does not support.
    pub fn reply(&self) -> Reply {
        Reply::new(
            504,
            EnhancedCode::new(5, 5, 4),
            "Unrecognized authentication type",
        )
    }
}

/// What to do after feeding the exchange.
#[derive(Debug)]
pub enum Step {
    /// Send `334 ` followed by this base64 text (see [`write_challenge`]) and pass the
    /// next line to [`ServerExchange::on_line`].
    Challenge(&'static [u8]),
    /// The client has said who it is; checking that is the caller's job.
    Done(Credentials),
    /// The exchange is over without credentials; send [`Failure::reply`].
    Failed(Failure),
}

/// Why an exchange ended without credentials. [`Failure::reply`] is the one place that
/// turns it into a reply. The variants carry no client data, so logging them is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The client answered a challenge with `*` (RFC 4954 §4).
    #[error("client cancelled the authentication exchange")]
    Cancelled,
    /// Not canonical base64, or a decoded message the mechanism does not allow.
    #[error("malformed authentication response: {0}")]
    Malformed(&'static str),
    /// A response longer than [`MAX_RESPONSE_BYTES`].
    #[error("authentication response longer than {MAX_RESPONSE_BYTES} bytes")]
    TooLong,
}

impl Failure {
    /// The reply for this failure (RFC 4954 §4 and §6).
    pub fn reply(&self) -> Reply {
        match self {
            // RFC 4954 §4: a cancelled exchange is rejected with 501.
            Self::Cancelled => {
                Reply::new(501, EnhancedCode::new(5, 0, 0), "Authentication cancelled")
            }
            // RFC 4954 §4: a response that cannot be decoded is rejected with 501; 5.5.2
            // is RFC 3463's "syntax error".
            Self::Malformed(_) => {
                Reply::new(501, EnhancedCode::new(5, 5, 2), "Cannot decode response")
            }
            // RFC 4954 §6 registers 5.5.6 for exactly this.
            Self::TooLong => Reply::new(
                500,
                EnhancedCode::new(5, 5, 6),
                "Authentication Exchange line is too long",
            ),
        }
    }
}

/// Appends a challenge line, `334 <base64>` and CRLF, to `out`.
///
/// The space is written even for PLAIN's empty challenge: RFC 4954 §4 shows `334 `
/// and some clients look for it, whereas [`Reply::write_to`] would drop it.
pub fn write_challenge(challenge: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"334 ");
    out.extend_from_slice(challenge);
    out.extend_from_slice(b"\r\n");
}

/// Who the client says it is. Produced only by a completed exchange.
#[derive(Debug)]
pub struct Credentials {
    /// The authentication identity (PLAIN's authcid, LOGIN's user name).
    /// Invariant: 1..=[`MAX_FIELD_BYTES`] octets of UTF-8 without NUL.
    pub username: String,
    /// The identity the client asks to act as (RFC 4616 §2), present only when it is
    /// non-empty and differs from `username`. Unless the caller supports acting on
    /// someone else's behalf it must refuse `Some` (see the module docs).
    /// Invariant when present: 1..=[`MAX_FIELD_BYTES`] octets of UTF-8 without NUL.
    pub authzid: Option<String>,
    /// Invariant: 1..=[`MAX_FIELD_BYTES`] octets of UTF-8 without NUL.
    password: Password,
}

impl Credentials {
    /// The password, for the caller's check; see [`Password`].
    pub fn password(&self) -> &Password {
        &self.password
    }
}

/// A password: never printed, wiped when dropped.
///
/// Wiping is best effort. `Drop` overwrites the whole allocation (spare capacity
/// included) with zeros and passes the buffer through [`std::hint::black_box`] so the
/// optimiser has a reason to keep the writes, but Rust promises nothing here: without
/// `unsafe` volatile writes the stores may in principle still be removed. It also
/// cannot reach copies made elsewhere: the base64 text of the password in the caller's
/// receive buffer, whatever the caller does with [`Password::expose`], or pages the
/// kernel swapped out (nothing is `mlock`ed).
pub struct Password(SecretBytes);

impl Password {
    /// The password's octets (UTF-8, checked), for the caller's comparison.
    pub fn expose(&self) -> &[u8] {
        &self.0.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("***")
    }
}

/// Bytes that are zeroed before their allocation is freed (see [`Password`] for the
/// limits). Deliberately not `Clone`: every copy would be one more to wipe.
struct SecretBytes(Vec<u8>);

impl Drop for SecretBytes {
    fn drop(&mut self) {
        let capacity = self.0.capacity();
        self.0.fill(0);
        // Zero the spare capacity too; `resize` within the capacity never reallocates.
        self.0.resize(capacity, 0);
        std::hint::black_box(&mut self.0);
    }
}

/// An AUTH exchange in progress.
#[derive(Debug)]
pub struct ServerExchange {
    state: State,
}

#[derive(Debug)]
enum State {
    /// PLAIN sent its empty challenge; the next line is the whole message.
    PlainMessage,
    /// LOGIN asked for the user name.
    LoginUsername,
    /// LOGIN asked for the password. `username` has passed [`check_field`].
    LoginPassword { username: String },
    /// `Done` or `Failed` was returned; no further line is valid.
    Finished,
}

impl ServerExchange {
    /// Starts an exchange for `mechanism`.
    ///
    /// `initial_response` is AUTH's second argument as written (RFC 4954 §4): base64,
    /// or `=` for an empty response. PLAIN without one sends an empty challenge;
    /// LOGIN without one asks for the user name, and LOGIN with one takes it as the
    /// user name and asks for the password, as widely deployed clients expect.
    /// `*` is not a cancellation here (RFC 4954 §4 defines it only as an answer to a
    /// challenge), so it fails as malformed base64.
    pub fn start(mechanism: Mechanism, initial_response: Option<&[u8]>) -> (Self, Step) {
        let mut exchange = Self {
            state: match mechanism {
                Mechanism::Plain => State::PlainMessage,
                Mechanism::Login => State::LoginUsername,
            },
        };
        let step = match initial_response {
            None => match exchange.state {
                State::PlainMessage => Step::Challenge(EMPTY_CHALLENGE),
                _ => Step::Challenge(LOGIN_USERNAME_CHALLENGE),
            },
            // RFC 4954 §4: "=" is an initial response of zero length.
            Some(b"=") => exchange.on_decoded(SecretBytes(Vec::new())),
            Some(text) => exchange.on_text(text),
        };
        (exchange, step)
    }

    /// Takes the client's answer to the last challenge: one line without its CRLF.
    ///
    /// `*` cancels (RFC 4954 §4). An empty line is an empty response; `=` is not (it
    /// means "empty" only as an initial response) and fails as malformed. After
    /// `Done` or `Failed` the exchange is over and every further line fails as
    /// malformed: the session should have left AUTH mode.
    pub fn on_line(&mut self, line: &[u8]) -> Step {
        if matches!(self.state, State::Finished) {
            return Step::Failed(Failure::Malformed(
                "authentication exchange already finished",
            ));
        }
        if line == b"*" {
            self.state = State::Finished;
            return Step::Failed(Failure::Cancelled);
        }
        self.on_text(line)
    }

    /// Decodes a response and hands it to the mechanism.
    fn on_text(&mut self, text: &[u8]) -> Step {
        if text.len() > MAX_RESPONSE_BYTES {
            self.state = State::Finished;
            return Step::Failed(Failure::TooLong);
        }
        match decode_base64(text) {
            Ok(decoded) => self.on_decoded(SecretBytes(decoded)),
            Err(error) => {
                self.state = State::Finished;
                Step::Failed(Failure::Malformed(error.detail()))
            }
        }
    }

    fn on_decoded(&mut self, decoded: SecretBytes) -> Step {
        match std::mem::replace(&mut self.state, State::Finished) {
            State::PlainMessage => match parse_plain(&decoded.0) {
                Ok(credentials) => Step::Done(credentials),
                Err(failure) => Step::Failed(failure),
            },
            State::LoginUsername => match check_field(&decoded.0, &LOGIN_USERNAME) {
                Ok(username) => {
                    self.state = State::LoginPassword {
                        username: username.to_owned(),
                    };
                    Step::Challenge(LOGIN_PASSWORD_CHALLENGE)
                }
                Err(failure) => Step::Failed(failure),
            },
            State::LoginPassword { username } => match check_field(&decoded.0, &PASSWORD) {
                Ok(password) => Step::Done(Credentials {
                    username,
                    authzid: None,
                    password: Password(SecretBytes(password.as_bytes().to_vec())),
                }),
                Err(failure) => Step::Failed(failure),
            },
            State::Finished => Step::Failed(Failure::Malformed(
                "authentication exchange already finished",
            )),
        }
    }
}

/// A PLAIN message: `[authzid] NUL authcid NUL passwd` (RFC 4616 §2).
fn parse_plain(message: &[u8]) -> Result<Credentials, Failure> {
    let mut fields = message.split(|&byte| byte == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(Failure::Malformed("PLAIN needs exactly two NULs"));
    };
    let username = check_field(authcid, &AUTHENTICATION_IDENTITY)?;
    let password = check_field(password, &PASSWORD)?;
    let authzid = if authzid.is_empty() || authzid == authcid {
        None
    } else {
        Some(check_field(authzid, &AUTHORIZATION_IDENTITY)?.to_owned())
    };
    Ok(Credentials {
        username: username.to_owned(),
        authzid,
        password: Password(SecretBytes(password.as_bytes().to_vec())),
    })
}

/// The error details for one field; they name the field, never its content.
struct Field {
    empty: &'static str,
    too_long: &'static str,
    has_nul: &'static str,
    not_utf8: &'static str,
}

const AUTHORIZATION_IDENTITY: Field = Field {
    empty: "empty authorization identity",
    too_long: "authorization identity longer than 255 octets",
    has_nul: "NUL in the authorization identity",
    not_utf8: "authorization identity is not UTF-8",
};
const AUTHENTICATION_IDENTITY: Field = Field {
    empty: "empty authentication identity",
    too_long: "authentication identity longer than 255 octets",
    has_nul: "NUL in the authentication identity",
    not_utf8: "authentication identity is not UTF-8",
};
const LOGIN_USERNAME: Field = Field {
    empty: "empty user name",
    too_long: "user name longer than 255 octets",
    has_nul: "NUL in the user name",
    not_utf8: "user name is not UTF-8",
};
const PASSWORD: Field = Field {
    empty: "empty password",
    too_long: "password longer than 255 octets",
    has_nul: "NUL in the password",
    not_utf8: "password is not UTF-8",
};

/// One identity or password: RFC 4616 §2's `1*SAFE` (non-empty UTF-8 without NUL) of
/// at most [`MAX_FIELD_BYTES`] octets. LOGIN's fields get the same rule.
fn check_field<'a>(value: &'a [u8], field: &Field) -> Result<&'a str, Failure> {
    if value.is_empty() {
        return Err(Failure::Malformed(field.empty));
    }
    if value.len() > MAX_FIELD_BYTES {
        return Err(Failure::Malformed(field.too_long));
    }
    // Only LOGIN can get here with a NUL; PLAIN's fields were split on it.
    if value.contains(&0) {
        return Err(Failure::Malformed(field.has_nul));
    }
    std::str::from_utf8(value).map_err(|_| Failure::Malformed(field.not_utf8))
}

/// Why [`decode_base64`] refused its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Base64Error {
    #[error("base64 longer than {MAX_BASE64_INPUT_BYTES} bytes")]
    TooLong,
    /// Not a multiple of four characters (padding is required, RFC 4648 §3.2).
    #[error("base64 length is not a multiple of four")]
    BadLength,
    /// A byte outside the standard alphabet (RFC 4648 §4), whitespace included
    /// (§3.3: "MUST reject" non-alphabet characters unless the spec says otherwise).
    #[error("byte outside the base64 alphabet")]
    BadCharacter,
    /// `=` anywhere but the last one or two positions.
    #[error("misplaced base64 padding")]
    BadPadding,
    /// Bits after the last full octet are not zero (RFC 4648 §3.5), so another
    /// encoder could not have produced this text.
    #[error("non-canonical base64 (pad bits set)")]
    NonCanonical,
}

impl Base64Error {
    fn detail(self) -> &'static str {
        match self {
            Self::TooLong => "base64 too long",
            Self::BadLength => "base64 length is not a multiple of four",
            Self::BadCharacter => "byte outside the base64 alphabet",
            Self::BadPadding => "misplaced base64 padding",
            Self::NonCanonical => "non-canonical base64",
        }
    }
}

/// Standard base64 with padding (RFC 4648 §4), appended to `out`: what the SMTP
/// client sends in AUTH, and the inverse of [`decode_base64`].
pub fn encode_base64(input: &[u8], out: &mut Vec<u8>) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    // The mask keeps the index below 64, the alphabet's length.
    let symbol = |index: u32| ALPHABET[(index & 0x3f) as usize];
    for chunk in input.chunks(3) {
        let [first, second, third] = match *chunk {
            [a] => [a, 0, 0],
            [a, b] => [a, b, 0],
            [a, b, c] => [a, b, c],
            // `chunks(3)` yields one to three bytes.
            _ => continue,
        };
        let group = u32::from(first) << 16 | u32::from(second) << 8 | u32::from(third);
        out.push(symbol(group >> 18));
        out.push(symbol(group >> 12));
        out.push(if chunk.len() > 1 {
            symbol(group >> 6)
        } else {
            b'='
        });
        out.push(if chunk.len() > 2 { symbol(group) } else { b'=' });
    }
}

/// Decodes strict base64: RFC 4648 §4's standard alphabet, padding required, no
/// whitespace or line breaks, and zero pad bits (§3.5), so that every byte string has
/// exactly one accepted encoding. The empty input decodes to nothing.
///
/// The output is allocated once, at most three quarters of `input.len()`, which is
/// bounded by [`MAX_BASE64_INPUT_BYTES`].
pub fn decode_base64(input: &[u8]) -> Result<Vec<u8>, Base64Error> {
    if input.len() > MAX_BASE64_INPUT_BYTES {
        return Err(Base64Error::TooLong);
    }
    let (quads, rest) = input.as_chunks::<4>();
    if !rest.is_empty() {
        return Err(Base64Error::BadLength);
    }
    let mut output = Vec::with_capacity(quads.len() * 3);
    let last_index = quads.len().saturating_sub(1);
    for (index, &[first, second, third, fourth]) in quads.iter().enumerate() {
        let first = sextet(first)?;
        let second = sextet(second)?;
        match (third, fourth) {
            (b'=', b'=') if index == last_index => {
                // One octet; the low four bits of `second` are padding.
                if second & 0x0f != 0 {
                    return Err(Base64Error::NonCanonical);
                }
                output.push((first << 2) | (second >> 4));
            }
            (b'=', _) => return Err(Base64Error::BadPadding),
            (third, b'=') if index == last_index => {
                // Two octets; the low two bits of `third` are padding.
                let third = sextet(third)?;
                if third & 0x03 != 0 {
                    return Err(Base64Error::NonCanonical);
                }
                output.push((first << 2) | (second >> 4));
                output.push((second << 4) | (third >> 2));
            }
            (_, b'=') => return Err(Base64Error::BadPadding),
            (third, fourth) => {
                let third = sextet(third)?;
                let fourth = sextet(fourth)?;
                output.push((first << 2) | (second >> 4));
                output.push((second << 4) | (third >> 2));
                output.push((third << 6) | fourth);
            }
        }
    }
    Ok(output)
}

/// The six-bit value of one character of the standard alphabet (RFC 4648 §4, table 1).
/// `=` is not in it: the caller handles padding by position.
fn sextet(character: u8) -> Result<u8, Base64Error> {
    match character {
        b'A'..=b'Z' => Ok(character - b'A'),
        b'a'..=b'z' => Ok(character - b'a' + 26),
        b'0'..=b'9' => Ok(character - b'0' + 52),
        b'+' => Ok(62),
        b'/' => Ok(63),
        b'=' => Err(Base64Error::BadPadding),
        _ => Err(Base64Error::BadCharacter),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test-side encoder (RFC 4648 §4 with padding), written independently of the
    /// decoder so that round trips check one against the other.
    fn encode(input: &[u8]) -> Vec<u8> {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut output = Vec::new();
        for group in input.chunks(3) {
            let mut bits: u32 = 0;
            for (position, &byte) in group.iter().enumerate() {
                bits |= u32::from(byte) << (16 - 8 * position);
            }
            for position in 0..4 {
                if position <= group.len() {
                    let index = (bits >> (18 - 6 * position)) & 0x3f;
                    output.push(ALPHABET[index as usize]);
                } else {
                    output.push(b'=');
                }
            }
        }
        output
    }

    /// What a step looks like, with the password exposed, for comparing in tables.
    #[derive(Debug, PartialEq, Eq)]
    enum Seen {
        Challenge(&'static [u8]),
        Done {
            username: String,
            authzid: Option<String>,
            password: Vec<u8>,
        },
        Failed(Failure),
    }

    fn seen(step: Step) -> Seen {
        match step {
            Step::Challenge(challenge) => Seen::Challenge(challenge),
            Step::Done(credentials) => Seen::Done {
                password: credentials.password().expose().to_vec(),
                username: credentials.username,
                authzid: credentials.authzid,
            },
            Step::Failed(failure) => Seen::Failed(failure),
        }
    }

    fn done(username: &str, authzid: Option<&str>, password: &str) -> Seen {
        Seen::Done {
            username: username.to_owned(),
            authzid: authzid.map(str::to_owned),
            password: password.as_bytes().to_vec(),
        }
    }

    fn malformed(detail: &'static str) -> Seen {
        Seen::Failed(Failure::Malformed(detail))
    }

    /// Runs an exchange: the initial response, then each line; returns every step.
    fn run(mechanism: Mechanism, initial: Option<&[u8]>, lines: &[&[u8]]) -> Vec<Seen> {
        let (mut exchange, first) = ServerExchange::start(mechanism, initial);
        let mut steps = vec![seen(first)];
        for line in lines {
            steps.push(seen(exchange.on_line(line)));
        }
        steps
    }

    const USERNAME: Seen = Seen::Challenge(LOGIN_USERNAME_CHALLENGE);
    const PASSWORD_PROMPT: Seen = Seen::Challenge(LOGIN_PASSWORD_CHALLENGE);
    const EMPTY: Seen = Seen::Challenge(EMPTY_CHALLENGE);

    #[test]
    fn challenges_are_the_base64_of_their_prompts() {
        assert_eq!(encode(b"Username:"), LOGIN_USERNAME_CHALLENGE);
        assert_eq!(encode(b"Password:"), LOGIN_PASSWORD_CHALLENGE);
    }

    #[test]
    fn exchange_cases() {
        use Mechanism::{Login, Plain};
        let plain = |message: &[u8]| encode(message);
        let long = "x".repeat(MAX_FIELD_BYTES);
        let too_long = "x".repeat(MAX_FIELD_BYTES + 1);
        let at_limit = plain(format!("\0{long}\0{long}").as_bytes());
        let authcid_over = plain(format!("\0{too_long}\0pw").as_bytes());
        let password_over = plain(format!("\0user\0{too_long}").as_bytes());
        let authzid_over = plain(format!("{too_long}\0user\0pw").as_bytes());
        let alice = plain(b"\0alice\0secret");
        let bare = b"alice\0secret".to_vec();
        /// Name, mechanism, initial response, later lines, every step seen.
        type Case = (
            &'static str,
            Mechanism,
            Option<Vec<u8>>,
            Vec<Vec<u8>>,
            Vec<Seen>,
        );
        let cases: Vec<Case> = vec![
            (
                "plain initial response",
                Plain,
                Some(alice.clone()),
                vec![],
                vec![done("alice", None, "secret")],
            ),
            (
                "plain after empty challenge",
                Plain,
                None,
                vec![alice.clone()],
                vec![EMPTY, done("alice", None, "secret")],
            ),
            (
                "plain initial response = is empty: no NULs",
                Plain,
                Some(b"=".to_vec()),
                vec![],
                vec![malformed("PLAIN needs exactly two NULs")],
            ),
            (
                "plain empty line is an empty response",
                Plain,
                None,
                vec![b"".to_vec()],
                vec![EMPTY, malformed("PLAIN needs exactly two NULs")],
            ),
            (
                "plain = on a line is not the empty response",
                Plain,
                None,
                vec![b"=".to_vec()],
                vec![EMPTY, malformed("base64 length is not a multiple of four")],
            ),
            (
                "plain cancel",
                Plain,
                None,
                vec![b"*".to_vec()],
                vec![EMPTY, Seen::Failed(Failure::Cancelled)],
            ),
            (
                "plain * as initial response is not a cancel",
                Plain,
                Some(b"*".to_vec()),
                vec![],
                vec![malformed("base64 length is not a multiple of four")],
            ),
            (
                "plain authzid equal to authcid",
                Plain,
                Some(plain(b"alice\0alice\0secret")),
                vec![],
                vec![done("alice", None, "secret")],
            ),
            (
                "plain foreign authzid is reported",
                Plain,
                Some(plain(b"bob\0alice\0secret")),
                vec![],
                vec![done("alice", Some("bob"), "secret")],
            ),
            (
                "plain authzid differing only in case is foreign",
                Plain,
                Some(plain(b"Alice\0alice\0secret")),
                vec![],
                vec![done("alice", Some("Alice"), "secret")],
            ),
            (
                "plain utf-8 fields",
                Plain,
                Some(plain("\0ユーザー\0пароль".as_bytes())),
                vec![],
                vec![done("ユーザー", None, "пароль")],
            ),
            (
                "plain fields at 255 octets",
                Plain,
                Some(at_limit.clone()),
                vec![],
                vec![done(&long, None, &long)],
            ),
            (
                "plain authcid over 255",
                Plain,
                Some(authcid_over.clone()),
                vec![],
                vec![malformed("authentication identity longer than 255 octets")],
            ),
            (
                "plain password over 255",
                Plain,
                Some(password_over.clone()),
                vec![],
                vec![malformed("password longer than 255 octets")],
            ),
            (
                "plain authzid over 255",
                Plain,
                Some(authzid_over.clone()),
                vec![],
                vec![malformed("authorization identity longer than 255 octets")],
            ),
            (
                "plain no NUL",
                Plain,
                Some(plain(b"alicesecret")),
                vec![],
                vec![malformed("PLAIN needs exactly two NULs")],
            ),
            (
                "plain one NUL",
                Plain,
                Some(plain(&bare)),
                vec![],
                vec![malformed("PLAIN needs exactly two NULs")],
            ),
            (
                "plain three NULs",
                Plain,
                Some(plain(b"\0alice\0sec\0ret")),
                vec![],
                vec![malformed("PLAIN needs exactly two NULs")],
            ),
            (
                "plain empty authcid",
                Plain,
                Some(plain(b"\0\0secret")),
                vec![],
                vec![malformed("empty authentication identity")],
            ),
            (
                "plain empty password",
                Plain,
                Some(plain(b"\0alice\0")),
                vec![],
                vec![malformed("empty password")],
            ),
            (
                "plain non-utf-8 authcid",
                Plain,
                Some(plain(b"\0al\xffice\0secret")),
                vec![],
                vec![malformed("authentication identity is not UTF-8")],
            ),
            (
                "plain non-utf-8 password",
                Plain,
                Some(plain(b"\0alice\0se\xc3cret")),
                vec![],
                vec![malformed("password is not UTF-8")],
            ),
            (
                "plain non-utf-8 authzid",
                Plain,
                Some(plain(b"\xff\0alice\0secret")),
                vec![],
                vec![malformed("authorization identity is not UTF-8")],
            ),
            (
                "plain bad base64",
                Plain,
                Some(b"AGFsaWNlAHNlY3JldA".to_vec()),
                vec![],
                vec![malformed("base64 length is not a multiple of four")],
            ),
            (
                "plain base64 with a trailing space",
                Plain,
                None,
                vec![b"AGFsaWNlAHNlY3JldA== ".to_vec()],
                vec![EMPTY, malformed("base64 length is not a multiple of four")],
            ),
            (
                "login both steps",
                Login,
                None,
                vec![b"YWxpY2U=".to_vec(), b"c2VjcmV0".to_vec()],
                vec![USERNAME, PASSWORD_PROMPT, done("alice", None, "secret")],
            ),
            (
                "login user name as initial response",
                Login,
                Some(b"YWxpY2U=".to_vec()),
                vec![b"c2VjcmV0".to_vec()],
                vec![PASSWORD_PROMPT, done("alice", None, "secret")],
            ),
            (
                "login = initial response is an empty user name",
                Login,
                Some(b"=".to_vec()),
                vec![],
                vec![malformed("empty user name")],
            ),
            (
                "login cancel at user name",
                Login,
                None,
                vec![b"*".to_vec()],
                vec![USERNAME, Seen::Failed(Failure::Cancelled)],
            ),
            (
                "login cancel at password",
                Login,
                None,
                vec![b"YWxpY2U=".to_vec(), b"*".to_vec()],
                vec![USERNAME, PASSWORD_PROMPT, Seen::Failed(Failure::Cancelled)],
            ),
            (
                "login empty password line",
                Login,
                None,
                vec![b"YWxpY2U=".to_vec(), b"".to_vec()],
                vec![USERNAME, PASSWORD_PROMPT, malformed("empty password")],
            ),
            (
                "login NUL in the user name",
                Login,
                None,
                vec![plain(b"al\0ice")],
                vec![USERNAME, malformed("NUL in the user name")],
            ),
            (
                "login non-utf-8 password",
                Login,
                None,
                vec![b"YWxpY2U=".to_vec(), plain(b"\xff")],
                vec![
                    USERNAME,
                    PASSWORD_PROMPT,
                    malformed("password is not UTF-8"),
                ],
            ),
            (
                "login user name over 255",
                Login,
                None,
                vec![authcid_over.clone(), b"c2VjcmV0".to_vec()],
                vec![
                    USERNAME,
                    // Decodes to 263 octets with NULs; the length is checked first.
                    malformed("user name longer than 255 octets"),
                    malformed("authentication exchange already finished"),
                ],
            ),
            (
                "lines after the end fail",
                Plain,
                Some(alice.clone()),
                vec![b"*".to_vec(), alice.clone()],
                vec![
                    done("alice", None, "secret"),
                    malformed("authentication exchange already finished"),
                    malformed("authentication exchange already finished"),
                ],
            ),
        ];
        for (name, mechanism, initial, lines, expected) in cases {
            let lines: Vec<&[u8]> = lines.iter().map(Vec::as_slice).collect();
            assert_eq!(
                run(mechanism, initial.as_deref(), &lines),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn too_long_lines() {
        // 12,286 is not a multiple of four: the longest base64 that fits is 12,284.
        let longest_base64 = vec![b'A'; MAX_RESPONSE_BYTES / 4 * 4];
        let at_limit = vec![b'A'; MAX_RESPONSE_BYTES];
        let over = vec![b'A'; MAX_RESPONSE_BYTES + 1];
        // Within the limit the line is decoded (and fails as PLAIN: no NULs)...
        assert_eq!(
            run(Mechanism::Plain, None, &[&longest_base64]),
            vec![EMPTY, malformed("PLAIN needs exactly two NULs")]
        );
        assert_eq!(
            run(Mechanism::Plain, None, &[&at_limit]),
            vec![EMPTY, malformed("base64 length is not a multiple of four")]
        );
        // ...one more octet is refused before decoding, as a response and as an
        // initial response.
        assert_eq!(
            run(Mechanism::Plain, None, &[&over]),
            vec![EMPTY, Seen::Failed(Failure::TooLong)]
        );
        assert_eq!(
            run(Mechanism::Login, Some(&over), &[]),
            vec![Seen::Failed(Failure::TooLong)]
        );
        assert_eq!(
            run(Mechanism::Login, None, &[b"YWxpY2U=", &over]),
            vec![USERNAME, PASSWORD_PROMPT, Seen::Failed(Failure::TooLong)]
        );
        assert_eq!(decode_base64(&over), Err(Base64Error::TooLong));
    }

    #[test]
    fn base64_rfc4648_vectors() {
        // RFC 4648 §10.
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, expected) in cases {
            let mut out = Vec::new();
            encode_base64(input.as_bytes(), &mut out);
            assert_eq!(out, expected.as_bytes(), "{input:?}");
        }
    }

    #[test]
    fn decode_base64_cases() {
        use Base64Error::*;
        type Case = (
            &'static str,
            &'static [u8],
            Result<&'static [u8], Base64Error>,
        );
        let cases: &[Case] = &[
            ("empty", b"", Ok(b"")),
            ("one octet", b"Zg==", Ok(b"f")),
            ("two octets", b"Zm8=", Ok(b"fo")),
            ("three octets", b"Zm9v", Ok(b"foo")),
            ("six octets", b"Zm9vYmFy", Ok(b"foobar")),
            ("four octets", b"Zm9vYg==", Ok(b"foob")),
            ("all sextets", b"+/+/", Ok(b"\xfb\xff\xbf")),
            ("zeros", b"AAAA", Ok(b"\0\0\0")),
            ("missing padding", b"Zg", Err(BadLength)),
            ("short padding", b"Zg=", Err(BadLength)),
            ("lone =", b"=", Err(BadLength)),
            ("only padding", b"====", Err(BadPadding)),
            ("three pads", b"Z===", Err(BadPadding)),
            ("pad then data", b"Zg=a", Err(BadPadding)),
            ("padding mid-text", b"Zg==Zm9v", Err(BadPadding)),
            ("pad in first pair", b"=Zg=", Err(BadPadding)),
            ("non-zero pad bits, one octet", b"Zh==", Err(NonCanonical)),
            ("non-zero pad bits, two octets", b"Zm9=", Err(NonCanonical)),
            ("crlf", b"Zm9v\r\n", Err(BadLength)),
            ("inner space", b"Zm 9", Err(BadCharacter)),
            ("url-safe alphabet", b"-_-_", Err(BadCharacter)),
            ("NUL", b"Zm9\0", Err(BadCharacter)),
            ("high byte", b"Zm9\xc3", Err(BadCharacter)),
        ];
        for (name, input, expected) in cases {
            let expected = expected.map(<[u8]>::to_vec);
            assert_eq!(decode_base64(input), expected, "{name}");
        }
    }

    #[test]
    fn mechanism_parse_cases() {
        let cases: &[(&[u8], Result<Mechanism, UnknownMechanism>)] = &[
            (b"PLAIN", Ok(Mechanism::Plain)),
            (b"plain", Ok(Mechanism::Plain)),
            (b"PlAiN", Ok(Mechanism::Plain)),
            (b"LOGIN", Ok(Mechanism::Login)),
            (b"login", Ok(Mechanism::Login)),
            (b"CRAM-MD5", Err(UnknownMechanism)),
            (b"PLAINX", Err(UnknownMechanism)),
            (b"PLAI", Err(UnknownMechanism)),
            (b"", Err(UnknownMechanism)),
            // ASCII case folding only: a dotted capital I is not an I.
            ("LOGİN".as_bytes(), Err(UnknownMechanism)),
        ];
        for (name, expected) in cases {
            assert_eq!(
                Mechanism::parse(name),
                *expected,
                "{}",
                String::from_utf8_lossy(name)
            );
        }
        for mechanism in [Mechanism::Plain, Mechanism::Login] {
            assert_eq!(Mechanism::parse(mechanism.name().as_bytes()), Ok(mechanism));
        }
    }

    #[test]
    fn replies() {
        let cases: &[(Reply, &str)] = &[
            (
                UnknownMechanism.reply(),
                "504 5.5.4 Unrecognized authentication type\r\n",
            ),
            (
                Failure::Cancelled.reply(),
                "501 5.0.0 Authentication cancelled\r\n",
            ),
            (
                Failure::Malformed("anything").reply(),
                "501 5.5.2 Cannot decode response\r\n",
            ),
            (
                Failure::TooLong.reply(),
                "500 5.5.6 Authentication Exchange line is too long\r\n",
            ),
        ];
        for (reply, expected) in cases {
            let mut out = Vec::new();
            reply.write_to(&mut out);
            assert_eq!(String::from_utf8_lossy(&out), *expected);
        }
    }

    #[test]
    fn write_challenge_keeps_the_space() {
        let mut out = Vec::new();
        write_challenge(EMPTY_CHALLENGE, &mut out);
        write_challenge(LOGIN_USERNAME_CHALLENGE, &mut out);
        assert_eq!(out, b"334 \r\n334 VXNlcm5hbWU6\r\n");
    }

    #[test]
    fn debug_never_shows_the_password() {
        let password = "hunter2-very-secret";
        let message = encode(format!("\0alice\0{password}").as_bytes());
        let (exchange, step) = ServerExchange::start(Mechanism::Plain, Some(&message));
        let step_debug = format!("{step:?} {exchange:?}");
        let Step::Done(credentials) = step else {
            panic!("expected credentials, got {step_debug}");
        };
        let debug = format!("{credentials:?} {:?}", credentials.password());
        let pretty = format!("{credentials:#?}");
        for text in [&step_debug, &debug, &pretty] {
            assert!(!text.contains(password), "{text}");
            assert!(text.contains("***"), "{text}");
        }
        assert!(debug.contains("alice"));

        // LOGIN keeps the user name between steps; the password never reaches a state.
        let (mut exchange, _) = ServerExchange::start(Mechanism::Login, Some(b"YWxpY2U="));
        let step = exchange.on_line(&encode(password.as_bytes()));
        let text = format!("{step:?} {exchange:?}");
        assert!(!text.contains(password), "{text}");

        // Failures never echo what the client sent.
        let (_, step) = ServerExchange::start(
            Mechanism::Plain,
            Some(&encode(format!("\0alice\0{password}\0").as_bytes())),
        );
        let Step::Failed(failure) = step else {
            panic!("three NULs must fail");
        };
        assert!(!format!("{failure} {failure:?}").contains(password));
    }

    #[test]
    fn secret_bytes_are_zeroed_in_place() {
        // Drop's effect cannot be observed after the free without unsafe, so run the
        // same wipe on a buffer we still own.
        let mut secret = SecretBytes(Vec::with_capacity(16));
        secret.0.extend_from_slice(b"secret");
        let mut taken = SecretBytes(std::mem::take(&mut secret.0));
        let pointer = taken.0.as_ptr();
        let capacity = taken.0.capacity();
        // What Drop does, minus the free.
        taken.0.fill(0);
        taken.0.resize(capacity, 0);
        assert_eq!(taken.0.as_ptr(), pointer, "wiping must not reallocate");
        assert!(taken.0.iter().all(|&byte| byte == 0));
        assert_eq!(taken.0.len(), capacity);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A field as RFC 4616 allows it: 1..=255 octets of UTF-8 without NUL.
        fn field() -> impl Strategy<Value = String> {
            "[^\u{0}]{1,80}".prop_filter("at most 255 octets", |text| text.len() <= MAX_FIELD_BYTES)
        }

        proptest! {
            #[test]
            fn plain_round_trip(
                username in field(),
                authzid in proptest::option::of(field()),
                password in field(),
                initial in any::<bool>(),
            ) {
                let message = format!(
                    "{}\0{username}\0{password}",
                    authzid.as_deref().unwrap_or_default()
                );
                let encoded = encode(message.as_bytes());
                let steps = if initial {
                    run(Mechanism::Plain, Some(&encoded), &[])
                } else {
                    run(Mechanism::Plain, None, &[&encoded])
                };
                let expected_authzid = authzid.filter(|authzid| *authzid != username);
                let expected = Seen::Done {
                    username,
                    authzid: expected_authzid,
                    password: password.into_bytes(),
                };
                prop_assert_eq!(steps.last(), Some(&expected));
            }

            #[test]
            fn login_round_trip(username in field(), password in field()) {
                let steps = run(
                    Mechanism::Login,
                    None,
                    &[&encode(username.as_bytes()), &encode(password.as_bytes())],
                );
                prop_assert_eq!(
                    steps,
                    vec![USERNAME, PASSWORD_PROMPT, done(&username, None, &password)]
                );
            }

            #[test]
            fn base64_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
                prop_assert_eq!(decode_base64(&encode(&bytes)), Ok(bytes));
            }

            /// Strictness: whatever the decoder accepts is exactly what the encoder
            /// would have written, so no two texts decode to the same bytes.
            #[test]
            fn accepted_base64_is_canonical(
                text in proptest::collection::vec(
                    prop::sample::select(b"AZaz09+/=QgwE".to_vec()),
                    0..40,
                )
            ) {
                if let Ok(decoded) = decode_base64(&text) {
                    prop_assert_eq!(encode(&decoded), text);
                }
            }

            #[test]
            fn arbitrary_lines_never_panic(
                mechanism in prop::sample::select(vec![Mechanism::Plain, Mechanism::Login]),
                initial in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
                lines in proptest::collection::vec(
                    proptest::collection::vec(any::<u8>(), 0..64),
                    0..4,
                ),
            ) {
                let lines: Vec<&[u8]> = lines.iter().map(Vec::as_slice).collect();
                for step in run(mechanism, initial.as_deref(), &lines) {
                    if let Seen::Done { username, password, .. } = step {
                        prop_assert!(!username.is_empty() && username.len() <= MAX_FIELD_BYTES);
                        prop_assert!(!password.is_empty() && password.len() <= MAX_FIELD_BYTES);
                    }
                }
            }

            /// The same, with lines that are valid base64 of random bytes, so the
            /// mechanisms' parsers see arbitrary decoded input.
            #[test]
            fn arbitrary_decoded_messages_never_panic(
                mechanism in prop::sample::select(vec![Mechanism::Plain, Mechanism::Login]),
                messages in proptest::collection::vec(
                    proptest::collection::vec(
                        prop::sample::select(b"\0ab\xc3\xa9\xff".to_vec()),
                        0..40,
                    ),
                    1..4,
                ),
            ) {
                let encoded: Vec<Vec<u8>> = messages.iter().map(|message| encode(message)).collect();
                let lines: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
                let _ = run(mechanism, None, &lines);
                let _ = run(mechanism, lines.first().copied(), lines.get(1..).unwrap_or_default());
            }
        }
    }
}
