//! Client AUTH exchanges over RFC 4954's AUTH command: PLAIN (RFC 4616) and LOGIN
//! (draft-murchison-sasl-login) with a password, XOAUTH2 (Google's) and OAUTHBEARER
//! (RFC 7628) with an OAuth 2.0 bearer token (RFC 6750).
//!
//! Each exchange is a state machine over bytes: a constructor returns the first line
//! to write, [`AuthExchange::on_reply`] the next one or the end.
//!
//! Secrets stay out of `Debug` output and errors: passwords and tokens are
//! [`Secret`]s and the command lines that carry them are [`SecretBytes`].
//!
//! # Bearer tokens
//!
//! Both token mechanisms send everything in the initial response (RFC 4954 §4), so a
//! good token takes one round trip. A refused token gets a `334` whose text is a
//! base64 JSON error (RFC 7628 §3.2.2; Google's XOAUTH2 sends the same shape); the
//! client must answer it (XOAUTH2: an empty line, OAUTHBEARER: `AQ==`, a single
//! `%x01`, RFC 7628 §3.2.3) and the server then fails the exchange with `535`. Either
//! way the result is [`AuthError::TokenRejected`], distinct from every other failure,
//! so the caller can fetch a fresh token and try once more.
//!
//! ```text
//! C: AUTH XOAUTH2 dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5...AQ==
//! S: 334 eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==
//! C:
//! S: 535 5.7.8 Username and Password not accepted
//! ```

use std::fmt;

use tsubame_smtp_proto::sasl::{MAX_AUTH_LINE_BYTES, decode_base64, encode_base64};

use crate::reply::Reply;

/// The reply to AUTH that means "credentials invalid" (RFC 4954 §6, `535 5.7.8`).
/// After a bearer token it means the token was refused.
const CREDENTIALS_INVALID_CODE: u16 = 535;

/// Longest value kept from a bearer error challenge, in bytes. The values are short
/// in practice (Google's longest, the scope, is 24 bytes); a longer or non-printable
/// one is dropped, so what a server sends cannot flood a log line.
pub const MAX_BEARER_ERROR_VALUE_BYTES: usize = 256;

/// Room for the fixed parts of a bearer initial response (key names, `%x01`
/// separators, the port), so the buffer that holds the token is allocated once and
/// no copy of the token is left behind by a reallocation.
const BEARER_FRAMING_BYTES: usize = 40;

/// Bytes one username byte may take in an OAUTHBEARER GS2 header (`,` → `=2C`).
const ESCAPED_BYTE_MAX: usize = 3;

/// A password or other credential. `Debug` prints `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself, for encoding only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("***")
    }
}

/// Bytes to write that embed a secret. `Debug` prints only the length.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    /// The bytes to write on the wire.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "SecretBytes({} bytes)", self.0.len())
    }
}

/// The SASL mechanisms that carry an OAuth 2.0 bearer token instead of a password.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BearerMechanism {
    /// Google's XOAUTH2 (Gmail, also Microsoft 365 and others): `user=` and
    /// `auth=Bearer` key-value pairs, each ended by `%x01`.
    XOAuth2,
    /// RFC 7628's OAUTHBEARER: a GS2 header naming the user as authorization
    /// identity, then `host`, `port` and `auth` key-value pairs.
    OAuthBearer,
}

impl BearerMechanism {
    /// The mechanism's name, as EHLO's AUTH line offers it and AUTH names it.
    pub fn name(self) -> &'static str {
        match self {
            Self::XOAuth2 => "XOAUTH2",
            Self::OAuthBearer => "OAUTHBEARER",
        }
    }

    /// The mechanism named `name`, in any case (for configuration files).
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::XOAuth2, Self::OAuthBearer]
            .into_iter()
            .find(|mechanism| mechanism.name().eq_ignore_ascii_case(name))
    }

    /// The answer to the server's error challenge, after which the server fails the
    /// exchange. XOAUTH2: an empty response (Google's documentation). OAUTHBEARER: a
    /// single `%x01` (RFC 7628 §3.2.3), base64 `AQ==`.
    fn error_acknowledgement(self) -> &'static [u8] {
        match self {
            Self::XOAuth2 => b"\r\n",
            Self::OAuthBearer => b"AQ==\r\n",
        }
    }
}

impl fmt::Display for BearerMechanism {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// What a bearer mechanism's error challenge said. The challenge is a JSON object
/// (RFC 7628 §3.2.2); Google's XOAUTH2 sends e.g.
/// `{"status":"401","schemes":"Bearer","scope":"https://mail.google.com/"}`. It is the
/// server's text and never holds the token. A value is kept only when it is a string
/// (or number) of at most [`MAX_BEARER_ERROR_VALUE_BYTES`] without control characters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BearerErrorDetail {
    /// RFC 7628: an error code from RFC 6750 §3.1 such as `invalid_token`; Google:
    /// an HTTP status, `400` or `401`.
    pub status: Option<String>,
    /// The scope a token needs to be accepted.
    pub scope: Option<String>,
    /// Google: the authentication schemes the server takes (`Bearer`).
    pub schemes: Option<String>,
}

impl BearerErrorDetail {
    /// Reads a `334` error challenge: base64 of a JSON object. `None` when the text is
    /// not base64 of a JSON object (the challenge is answered all the same).
    fn from_challenge(reply: &Reply) -> Option<Self> {
        let text = reply.lines.first()?.trim();
        let json = decode_base64(text.as_bytes()).ok()?;
        let value: serde_json::Value = serde_json::from_slice(&json).ok()?;
        let object = value.as_object()?;
        let field = |name: &str| -> Option<String> {
            let text = match object.get(name)? {
                serde_json::Value::String(text) => text.clone(),
                serde_json::Value::Number(number) => number.to_string(),
                _ => return None,
            };
            (text.len() <= MAX_BEARER_ERROR_VALUE_BYTES && !text.chars().any(char::is_control))
                .then_some(text)
        };
        Some(Self {
            status: field("status"),
            scope: field("scope"),
            schemes: field("schemes"),
        })
    }
}

impl fmt::Display for BearerErrorDetail {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fields = [
            ("status", &self.status),
            ("scope", &self.scope),
            ("schemes", &self.schemes),
        ];
        let mut separator = "";
        for (name, value) in fields {
            if let Some(value) = value {
                write!(formatter, "{separator}{name} {value:?}")?;
                separator = ", ";
            }
        }
        Ok(())
    }
}

/// Why credentials cannot be put into an AUTH exchange. Found before anything is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodingProblem {
    #[error("the username is empty")]
    EmptyUsername,
    /// A control character would end a key-value pair early (`%x01` separates them)
    /// or, as NUL, is not allowed in a SASL name (RFC 7628 §3.1).
    #[error("the username contains a control character")]
    ControlInUsername,
    /// RFC 6750 §2.1: `b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
    /// A token read from a file with its line break, or pasted with spaces, ends here.
    #[error("the token is not an RFC 6750 b64token (letters, digits, -._~+/, then = padding)")]
    TokenNotB64Token,
    #[error("the host name is empty or contains a control character")]
    InvalidHost,
    /// The AUTH line with its initial response would pass [`MAX_AUTH_LINE_BYTES`]
    /// (RFC 4954 §4); it is never truncated.
    #[error("the AUTH line would be longer than {MAX_AUTH_LINE_BYTES} bytes")]
    LineTooLong,
}

/// Why authentication did not succeed. Carries the server's reply, never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A failure reply (4xx or 5xx) other than [`Self::TokenRejected`]: a wrong
    /// password (535), a temporary failure (454), a mechanism refused (504), ...
    #[error("authentication rejected: {} {}", .0.code, .0.text())]
    Rejected(Reply),
    /// The upstream refused the bearer token: `535` to the initial response, or an
    /// error challenge and then `535`. The token is expired, revoked or lacks the
    /// scope: fetch a fresh one and try again (once). `detail` is what the error
    /// challenge said, when there was one the client could read.
    #[error(
        "the upstream rejected the bearer token: {} {}{}",
        .reply.code,
        .reply.text(),
        .detail.as_ref().map(|detail| format!(" (error challenge: {detail})")).unwrap_or_default()
    )]
    TokenRejected {
        reply: Reply,
        /// Boxed: it is rare, and would make every `Result` carrying the error larger.
        detail: Option<Box<BearerErrorDetail>>,
    },
    #[error("unexpected reply during authentication: {} {}", .0.code, .0.text())]
    Unexpected(Reply),
    #[error("a username or password contains NUL, which SASL PLAIN cannot carry")]
    NulInCredentials,
    /// The credentials (or the host name OAUTHBEARER carries) cannot be sent with
    /// `mechanism`; nothing was sent.
    #[error("cannot send AUTH {mechanism}: {problem}")]
    NotEncodable {
        mechanism: BearerMechanism,
        problem: EncodingProblem,
    },
}

/// What to do after a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// Write these bytes and wait for the next reply.
    Write(SecretBytes),
    /// Authenticated (235).
    Done,
}

/// One AUTH exchange. Start with [`AuthExchange::plain`], [`AuthExchange::login`],
/// [`AuthExchange::xoauth2`] or [`AuthExchange::oauthbearer`], write the first bytes,
/// then feed each reply to [`AuthExchange::on_reply`].
#[derive(Debug)]
pub struct AuthExchange {
    state: AuthState,
}

#[derive(Debug)]
enum AuthState {
    /// AUTH PLAIN with its initial response was sent; waiting for 235.
    Plain,
    /// AUTH LOGIN was sent; the first 334 asks for the username.
    LoginUsername { username: String, password: Secret },
    /// The username was sent; the next 334 asks for the password.
    LoginPassword { password: Secret },
    /// The password was sent; waiting for 235.
    LoginDone,
    /// AUTH XOAUTH2 or OAUTHBEARER with its initial response was sent; waiting for
    /// 235, or a 334 error challenge (the token was refused), or a failure.
    BearerSent { mechanism: BearerMechanism },
    /// The error challenge was answered; the server must now fail the exchange
    /// (RFC 7628 §3.2.3), and a 235 would be a protocol violation.
    BearerFailing {
        detail: Option<Box<BearerErrorDetail>>,
    },
    /// Finished, successfully or not; any further reply is unexpected.
    Finished,
}

impl AuthExchange {
    /// `AUTH PLAIN <base64(authzid NUL authcid NUL passwd)>` (RFC 4616 §2, with RFC
    /// 4954 §4's initial response so the exchange takes one round trip). The
    /// authorization identity is left empty: act as the user we log in as.
    pub fn plain(username: &str, password: &Secret) -> Result<(Self, SecretBytes), AuthError> {
        if username.contains('\0') || password.expose().contains('\0') {
            return Err(AuthError::NulInCredentials);
        }
        let mut message = Vec::with_capacity(username.len() + password.expose().len() + 2);
        message.push(0);
        message.extend_from_slice(username.as_bytes());
        message.push(0);
        message.extend_from_slice(password.expose().as_bytes());
        let mut line = b"AUTH PLAIN ".to_vec();
        encode_base64(&message, &mut line);
        line.extend_from_slice(b"\r\n");
        Ok((
            Self {
                state: AuthState::Plain,
            },
            SecretBytes(line),
        ))
    }

    /// `AUTH LOGIN`, then the username and the password, each base64-encoded, in
    /// answer to the server's two 334 challenges (whose text, "Username:" and
    /// "Password:", is not checked: servers vary it).
    pub fn login(username: &str, password: Secret) -> (Self, SecretBytes) {
        (
            Self {
                state: AuthState::LoginUsername {
                    username: username.to_owned(),
                    password,
                },
            },
            SecretBytes(b"AUTH LOGIN\r\n".to_vec()),
        )
    }

    /// `AUTH XOAUTH2 <base64("user=" user %x01 "auth=Bearer " token %x01 %x01)>`:
    /// Google's XOAUTH2, `username` being the account's email address.
    pub fn xoauth2(username: &str, token: &Secret) -> Result<(Self, SecretBytes), AuthError> {
        let mechanism = BearerMechanism::XOAuth2;
        let problem = |problem| AuthError::NotEncodable { mechanism, problem };
        check_username(username).map_err(problem)?;
        check_token(token).map_err(problem)?;
        let mut message =
            Vec::with_capacity(username.len() + token.expose().len() + BEARER_FRAMING_BYTES);
        message.extend_from_slice(b"user=");
        message.extend_from_slice(username.as_bytes());
        message.extend_from_slice(b"\x01auth=Bearer ");
        message.extend_from_slice(token.expose().as_bytes());
        message.extend_from_slice(b"\x01\x01");
        let line = initial_response_line(mechanism, &message).map_err(problem)?;
        Ok((Self::bearer(mechanism), line))
    }

    /// `AUTH OAUTHBEARER <base64(gs2-header %x01 host %x01 port %x01 auth %x01 %x01)>`
    /// (RFC 7628 §3.1): the GS2 header `n,a=<username>,` (no channel binding; the
    /// user as authorization identity, `,` and `=` escaped as `=2C` and `=3D`), then
    /// `host=`, `port=` (where the client connected) and `auth=Bearer <token>`.
    pub fn oauthbearer(
        username: &str,
        token: &Secret,
        host: &str,
        port: u16,
    ) -> Result<(Self, SecretBytes), AuthError> {
        let mechanism = BearerMechanism::OAuthBearer;
        let problem = |problem| AuthError::NotEncodable { mechanism, problem };
        check_username(username).map_err(problem)?;
        check_token(token).map_err(problem)?;
        if host.is_empty() || host.chars().any(char::is_control) {
            return Err(problem(EncodingProblem::InvalidHost));
        }
        let mut message = Vec::with_capacity(
            username.len() * ESCAPED_BYTE_MAX
                + host.len()
                + token.expose().len()
                + BEARER_FRAMING_BYTES,
        );
        message.extend_from_slice(b"n,a=");
        for byte in username.bytes() {
            match byte {
                b',' => message.extend_from_slice(b"=2C"),
                b'=' => message.extend_from_slice(b"=3D"),
                other => message.push(other),
            }
        }
        message.extend_from_slice(b",\x01host=");
        message.extend_from_slice(host.as_bytes());
        message.extend_from_slice(format!("\x01port={port}\x01auth=Bearer ").as_bytes());
        message.extend_from_slice(token.expose().as_bytes());
        message.extend_from_slice(b"\x01\x01");
        let line = initial_response_line(mechanism, &message).map_err(problem)?;
        Ok((Self::bearer(mechanism), line))
    }

    fn bearer(mechanism: BearerMechanism) -> Self {
        Self {
            state: AuthState::BearerSent { mechanism },
        }
    }

    pub fn on_reply(&mut self, reply: Reply) -> Result<AuthStep, AuthError> {
        let state = std::mem::replace(&mut self.state, AuthState::Finished);
        match (state, reply.code) {
            (AuthState::Plain | AuthState::LoginDone | AuthState::BearerSent { .. }, 235) => {
                Ok(AuthStep::Done)
            }
            (AuthState::BearerSent { mechanism }, 334) => {
                // The only challenge either mechanism has is the error (RFC 7628
                // §3.2.2): the token was refused, whatever the text says.
                self.state = AuthState::BearerFailing {
                    detail: BearerErrorDetail::from_challenge(&reply).map(Box::new),
                };
                Ok(AuthStep::Write(SecretBytes(
                    mechanism.error_acknowledgement().to_vec(),
                )))
            }
            (AuthState::BearerSent { .. }, CREDENTIALS_INVALID_CODE) => {
                Err(AuthError::TokenRejected {
                    reply,
                    detail: None,
                })
            }
            (AuthState::BearerFailing { detail }, CREDENTIALS_INVALID_CODE) => {
                Err(AuthError::TokenRejected { reply, detail })
            }
            (AuthState::LoginUsername { username, password }, 334) => {
                self.state = AuthState::LoginPassword { password };
                Ok(AuthStep::Write(encoded_line(username.as_bytes())))
            }
            (AuthState::LoginPassword { password }, 334) => {
                self.state = AuthState::LoginDone;
                Ok(AuthStep::Write(encoded_line(password.expose().as_bytes())))
            }
            (AuthState::Finished, _) => Err(AuthError::Unexpected(reply)),
            _ if reply.is_transient() || reply.is_permanent() => Err(AuthError::Rejected(reply)),
            _ => Err(AuthError::Unexpected(reply)),
        }
    }
}

/// `AUTH <mechanism> <base64(message)>\r\n`, refused when longer than
/// [`MAX_AUTH_LINE_BYTES`] (checked before the line is built).
fn initial_response_line(
    mechanism: BearerMechanism,
    message: &[u8],
) -> Result<SecretBytes, EncodingProblem> {
    let prefix = format!("AUTH {} ", mechanism.name());
    let line_bytes = prefix.len() + message.len().div_ceil(3) * 4 + 2;
    if line_bytes > MAX_AUTH_LINE_BYTES {
        return Err(EncodingProblem::LineTooLong);
    }
    let mut line = Vec::with_capacity(line_bytes);
    line.extend_from_slice(prefix.as_bytes());
    encode_base64(message, &mut line);
    line.extend_from_slice(b"\r\n");
    Ok(SecretBytes(line))
}

fn check_username(username: &str) -> Result<(), EncodingProblem> {
    if username.is_empty() {
        return Err(EncodingProblem::EmptyUsername);
    }
    if username.chars().any(char::is_control) {
        return Err(EncodingProblem::ControlInUsername);
    }
    Ok(())
}

/// RFC 6750 §2.1's b64token.
fn check_token(token: &Secret) -> Result<(), EncodingProblem> {
    let token = token.expose().as_bytes();
    let body = token
        .iter()
        .position(|&byte| byte == b'=')
        .map_or(token, |padding| token.get(..padding).unwrap_or_default());
    let padding = token.get(body.len()..).unwrap_or_default();
    let valid = !body.is_empty()
        && body
            .iter()
            .all(|&byte| byte.is_ascii_alphanumeric() || b"-._~+/".contains(&byte))
        && padding.iter().all(|&byte| byte == b'=');
    if valid {
        Ok(())
    } else {
        Err(EncodingProblem::TokenNotB64Token)
    }
}

fn encoded_line(bytes: &[u8]) -> SecretBytes {
    let mut line = Vec::with_capacity(bytes.len().div_ceil(3) * 4 + 2);
    encode_base64(bytes, &mut line);
    line.extend_from_slice(b"\r\n");
    SecretBytes(line)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::reply::parse_reply;

    fn reply(text: &str) -> Reply {
        parse_reply(text.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn plain_initial_response() {
        // RFC 4616 §4 example credentials ("tim", "tanstaaftanstaaf"), empty authzid.
        let (mut exchange, line) =
            AuthExchange::plain("tim", &Secret::new("tanstaaftanstaaf")).unwrap();
        assert_eq!(
            line.expose(),
            b"AUTH PLAIN AHRpbQB0YW5zdGFhZnRhbnN0YWFm\r\n"
        );
        assert_eq!(
            exchange.on_reply(reply("235 2.7.0 ok\r\n")),
            Ok(AuthStep::Done)
        );
    }

    #[test]
    fn plain_rejects_nul() {
        assert_eq!(
            AuthExchange::plain("a\0b", &Secret::new("p")).unwrap_err(),
            AuthError::NulInCredentials
        );
    }

    #[test]
    fn login_steps() {
        let (mut exchange, first) = AuthExchange::login("tim", Secret::new("tanstaaftanstaaf"));
        assert_eq!(first.expose(), b"AUTH LOGIN\r\n");
        let Ok(AuthStep::Write(username)) = exchange.on_reply(reply("334 VXNlcm5hbWU6\r\n")) else {
            panic!("username expected");
        };
        assert_eq!(username.expose(), b"dGlt\r\n");
        let Ok(AuthStep::Write(password)) = exchange.on_reply(reply("334 UGFzc3dvcmQ6\r\n")) else {
            panic!("password expected");
        };
        assert_eq!(password.expose(), b"dGFuc3RhYWZ0YW5zdGFhZg==\r\n");
        assert_eq!(exchange.on_reply(reply("235 ok\r\n")), Ok(AuthStep::Done));
        assert!(matches!(
            exchange.on_reply(reply("250 ok\r\n")),
            Err(AuthError::Unexpected(_))
        ));
    }

    #[test]
    fn rejections() {
        let cases = ["535 5.7.8 bad credentials\r\n", "454 4.7.0 try later\r\n"];
        for text in cases {
            let (mut exchange, _) = AuthExchange::login("u", Secret::new("p"));
            assert_eq!(
                exchange.on_reply(reply(text)),
                Err(AuthError::Rejected(reply(text)))
            );
            let (mut exchange, _) = AuthExchange::plain("u", &Secret::new("p")).unwrap();
            assert_eq!(
                exchange.on_reply(reply(text)),
                Err(AuthError::Rejected(reply(text)))
            );
        }
    }

    // The expected lines below were computed apart from this code, with Python's
    // `base64.b64encode` over the documented formats; the XOAUTH2 and OAUTHBEARER
    // vectors are also the examples of Google's XOAUTH2 documentation and of RFC 7628
    // §4.1.

    /// Google's documented example token, a b64token.
    const GOOGLE_TOKEN: &str = "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg";
    /// `{"status":"401","schemes":"Bearer","scope":"https://mail.google.com/"}`
    const GOOGLE_ERROR_CHALLENGE: &str = "334 eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==\r\n";
    /// RFC 7628 §4.3: `{"status":"invalid_token","scope":"example_scope",
    /// "openid-configuration":"https://example.com/.well-known/openid-configuration"}`
    const RFC7628_ERROR_CHALLENGE: &str = "334 eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NvcGUiOiJleGFtcGxlX3Njb3BlIiwib3BlbmlkLWNvbmZpZ3VyYXRpb24iOiJodHRwczovL2V4YW1wbGUuY29tLy53ZWxsLWtub3duL29wZW5pZC1jb25maWd1cmF0aW9uIn0=\r\n";

    fn xoauth2() -> AuthExchange {
        AuthExchange::xoauth2("someuser@example.com", &Secret::new(GOOGLE_TOKEN))
            .unwrap()
            .0
    }

    fn oauthbearer() -> AuthExchange {
        AuthExchange::oauthbearer("u@example.com", &Secret::new("t0k"), "mx.example", 587)
            .unwrap()
            .0
    }

    fn decoded_payload(line: &SecretBytes, prefix: &[u8]) -> Vec<u8> {
        let payload = line
            .expose()
            .strip_prefix(prefix)
            .unwrap()
            .strip_suffix(b"\r\n")
            .unwrap();
        decode_base64(payload).unwrap()
    }

    #[test]
    fn xoauth2_initial_response() {
        // "user=someuser@example.com^Aauth=Bearer ya29.vF9...Cg^A^A"
        let (mut exchange, line) =
            AuthExchange::xoauth2("someuser@example.com", &Secret::new(GOOGLE_TOKEN)).unwrap();
        assert_eq!(
            line.expose(),
            b"AUTH XOAUTH2 dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ==\r\n"
        );
        assert_eq!(
            exchange.on_reply(reply("235 2.7.0 Accepted\r\n")),
            Ok(AuthStep::Done)
        );
    }

    #[test]
    fn oauthbearer_initial_response() {
        // RFC 7628 §4.1: "n,a=user@example.com,^Ahost=server.example.com^Aport=587^A
        // auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==^A^A"
        let (mut exchange, line) = AuthExchange::oauthbearer(
            "user@example.com",
            &Secret::new("vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="),
            "server.example.com",
            587,
        )
        .unwrap();
        assert_eq!(
            line.expose(),
            b"AUTH OAUTHBEARER bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2VydmVyLmV4YW1wbGUuY29tAXBvcnQ9NTg3AWF1dGg9QmVhcmVyIHZGOWRmdDRxbVRjMk52YjNSbGNrQmhiSFJoZG1semRHRXVZMjl0Q2c9PQEB\r\n"
        );
        assert_eq!(
            exchange.on_reply(reply("235 2.7.0 ok\r\n")),
            Ok(AuthStep::Done)
        );
    }

    #[test]
    fn oauthbearer_escapes_the_authzid() {
        // RFC 7628 §3.1 (saslname, RFC 5801 §4): "," is "=2C" and "=" is "=3D".
        // "n,a=a=2Cb=3D=3Dc@example.com,^Ahost=mx.example^Aport=465^Aauth=Bearer t0k^A^A"
        let (_, line) =
            AuthExchange::oauthbearer("a,b==c@example.com", &Secret::new("t0k"), "mx.example", 465)
                .unwrap();
        assert_eq!(
            line.expose(),
            b"AUTH OAUTHBEARER bixhPWE9MkNiPTNEPTNEY0BleGFtcGxlLmNvbSwBaG9zdD1teC5leGFtcGxlAXBvcnQ9NDY1AWF1dGg9QmVhcmVyIHQwawEB\r\n"
        );
    }

    #[test]
    fn google_error_challenge_then_535_is_token_rejected() {
        let mut exchange = xoauth2();
        // Google's documented answer to the error challenge: an empty line.
        let Ok(AuthStep::Write(empty)) = exchange.on_reply(reply(GOOGLE_ERROR_CHALLENGE)) else {
            panic!("an answer to the challenge expected");
        };
        assert_eq!(empty.expose(), b"\r\n");
        let final_reply = reply(
            "535-5.7.8 Username and Password not accepted. For more information, go to\r\n\
             535 5.7.8  https://support.example/mail/?p=BadCredentials\r\n",
        );
        let error = exchange.on_reply(final_reply.clone()).unwrap_err();
        let detail = BearerErrorDetail {
            status: Some("401".to_owned()),
            scope: Some("https://mail.google.com/".to_owned()),
            schemes: Some("Bearer".to_owned()),
        };
        assert_eq!(
            error,
            AuthError::TokenRejected {
                reply: final_reply,
                detail: Some(Box::new(detail)),
            }
        );
        let message = error.to_string();
        assert!(
            message.starts_with("the upstream rejected the bearer token: 535 Username"),
            "{message}"
        );
        assert!(
            message.contains(
                r#"(error challenge: status "401", scope "https://mail.google.com/", schemes "Bearer")"#
            ),
            "{message}"
        );
        assert!(matches!(
            exchange.on_reply(reply("250 ok\r\n")),
            Err(AuthError::Unexpected(_))
        ));
    }

    #[test]
    fn oauthbearer_error_challenge_is_answered_with_kvsep() {
        let mut exchange = oauthbearer();
        let Ok(AuthStep::Write(answer)) = exchange.on_reply(reply(RFC7628_ERROR_CHALLENGE)) else {
            panic!("an answer to the challenge expected");
        };
        // RFC 7628 §3.2.3: a single %x01.
        assert_eq!(answer.expose(), b"AQ==\r\n");
        let final_reply = reply("535 5.7.8 Authentication credentials invalid\r\n");
        assert_eq!(
            exchange.on_reply(final_reply.clone()),
            Err(AuthError::TokenRejected {
                reply: final_reply,
                detail: Some(Box::new(BearerErrorDetail {
                    status: Some("invalid_token".to_owned()),
                    scope: Some("example_scope".to_owned()),
                    schemes: None,
                })),
            })
        );
    }

    #[test]
    fn bearer_failure_cases() {
        type Case = (
            &'static str,
            &'static [&'static str],
            fn(&AuthError) -> bool,
        );
        let cases: &[Case] = &[
            ("535 straight away", &["535 5.7.8 invalid\r\n"], |error| {
                matches!(error, AuthError::TokenRejected { detail: None, .. })
            }),
            (
                "a challenge that is not base64",
                &["334 not base64!\r\n", "535 5.7.8 invalid\r\n"],
                |error| matches!(error, AuthError::TokenRejected { detail: None, .. }),
            ),
            (
                "an empty challenge",
                &["334 \r\n", "535 5.7.8 invalid\r\n"],
                |error| matches!(error, AuthError::TokenRejected { detail: None, .. }),
            ),
            (
                // base64 of "[1]": JSON, but no object.
                "a challenge that is not a JSON object",
                &["334 WzFd\r\n", "535 5.7.8 invalid\r\n"],
                |error| matches!(error, AuthError::TokenRejected { detail: None, .. }),
            ),
            (
                "a temporary failure is no verdict on the token",
                &["454 4.7.0 try later\r\n"],
                |error| matches!(error, AuthError::Rejected(reply) if reply.code == 454),
            ),
            (
                "a temporary failure after the challenge",
                &[GOOGLE_ERROR_CHALLENGE, "454 4.7.0 try later\r\n"],
                |error| matches!(error, AuthError::Rejected(reply) if reply.code == 454),
            ),
            (
                "another 5xx is a plain rejection",
                &["534 5.7.9 policy\r\n"],
                |error| matches!(error, AuthError::Rejected(reply) if reply.code == 534),
            ),
            (
                "success after the error challenge violates RFC 7628 §3.2.3",
                &[GOOGLE_ERROR_CHALLENGE, "235 2.7.0 ok\r\n"],
                |error| matches!(error, AuthError::Unexpected(reply) if reply.code == 235),
            ),
            (
                "a second challenge",
                &[GOOGLE_ERROR_CHALLENGE, GOOGLE_ERROR_CHALLENGE],
                |error| matches!(error, AuthError::Unexpected(reply) if reply.code == 334),
            ),
        ];
        for (name, replies, expected) in cases {
            for mut exchange in [xoauth2(), oauthbearer()] {
                let (last, before) = replies.split_last().unwrap();
                for text in before {
                    assert!(
                        matches!(exchange.on_reply(reply(text)), Ok(AuthStep::Write(_))),
                        "{name}"
                    );
                }
                let error = exchange.on_reply(reply(last)).unwrap_err();
                assert!(expected(&error), "{name}: {error:?}");
            }
        }
    }

    #[test]
    fn error_challenge_values_are_bounded_and_printable() {
        let long = "s".repeat(MAX_BEARER_ERROR_VALUE_BYTES + 1);
        let json = format!(r#"{{"status":401,"scope":"{long}","schemes":"Bea\u0007rer"}}"#);
        let mut challenge = b"334 ".to_vec();
        encode_base64(json.as_bytes(), &mut challenge);
        challenge.extend_from_slice(b"\r\n");
        let detail =
            BearerErrorDetail::from_challenge(&reply(std::str::from_utf8(&challenge).unwrap()));
        assert_eq!(
            detail,
            Some(BearerErrorDetail {
                status: Some("401".to_owned()),
                scope: None,
                schemes: None,
            })
        );
    }

    #[test]
    fn unencodable_bearer_credentials() {
        use EncodingProblem::*;
        let cases: &[(&str, &str, &str, EncodingProblem)] = &[
            ("empty username", "", "t0k", EmptyUsername),
            (
                "kvsep in username",
                "a\x01b@example.com",
                "t0k",
                ControlInUsername,
            ),
            (
                "NUL in username",
                "a\0b@example.com",
                "t0k",
                ControlInUsername,
            ),
            ("empty token", "u@example.com", "", TokenNotB64Token),
            (
                "line break after the token",
                "u@example.com",
                "t0k\n",
                TokenNotB64Token,
            ),
            (
                "space in the token",
                "u@example.com",
                "t0 k",
                TokenNotB64Token,
            ),
            (
                "kvsep in the token",
                "u@example.com",
                "t0k\x01",
                TokenNotB64Token,
            ),
            (
                "padding inside the token",
                "u@example.com",
                "t0=k",
                TokenNotB64Token,
            ),
            ("padding only", "u@example.com", "==", TokenNotB64Token),
        ];
        for (name, username, token, problem) in cases {
            let token = Secret::new(*token);
            assert_eq!(
                AuthExchange::xoauth2(username, &token).unwrap_err(),
                AuthError::NotEncodable {
                    mechanism: BearerMechanism::XOAuth2,
                    problem: *problem
                },
                "{name}"
            );
            assert_eq!(
                AuthExchange::oauthbearer(username, &token, "mx.example", 587).unwrap_err(),
                AuthError::NotEncodable {
                    mechanism: BearerMechanism::OAuthBearer,
                    problem: *problem
                },
                "{name}"
            );
        }
        for host in ["", "mx\x01.example"] {
            assert_eq!(
                AuthExchange::oauthbearer("u@example.com", &Secret::new("t0k"), host, 587)
                    .unwrap_err(),
                AuthError::NotEncodable {
                    mechanism: BearerMechanism::OAuthBearer,
                    problem: InvalidHost
                },
                "{host:?}"
            );
        }
        // Every b64token character, and padding.
        for token in ["ya29.a0-_~+/Zz09", "abc=", "abc=="] {
            assert!(
                AuthExchange::xoauth2("u@example.com", &Secret::new(token)).is_ok(),
                "{token}"
            );
        }
    }

    #[test]
    fn long_tokens_are_sent_whole_up_to_the_rfc_4954_line_limit() {
        // Google's access tokens run to 2 KB and more.
        let token = "ya29.".to_owned() + &"aB3-_x".repeat(500);
        let (_, line) =
            AuthExchange::xoauth2("u@example.com", &Secret::new(token.as_str())).unwrap();
        let expected = format!("user=u@example.com\x01auth=Bearer {token}\x01\x01");
        assert_eq!(
            decoded_payload(&line, b"AUTH XOAUTH2 "),
            expected.as_bytes()
        );
        let (_, line) = AuthExchange::oauthbearer(
            "u@example.com",
            &Secret::new(token.as_str()),
            "mx.example",
            25,
        )
        .unwrap();
        let expected = format!(
            "n,a=u@example.com,\x01host=mx.example\x01port=25\x01auth=Bearer {token}\x01\x01"
        );
        assert_eq!(
            decoded_payload(&line, b"AUTH OAUTHBEARER "),
            expected.as_bytes()
        );

        // "AUTH XOAUTH2 " + base64("user=u" ^A "auth=Bearer " token ^A ^A) + CRLF: a
        // 9,183-byte token makes 12,287 bytes, one more byte 12,291.
        let longest = "t".repeat(9_183);
        let (_, line) = AuthExchange::xoauth2("u", &Secret::new(longest.as_str())).unwrap();
        assert_eq!(line.expose().len(), 12_287);
        assert!(line.expose().len() <= MAX_AUTH_LINE_BYTES);
        let too_long = "t".repeat(9_184);
        assert_eq!(
            AuthExchange::xoauth2("u", &Secret::new(too_long.as_str())).unwrap_err(),
            AuthError::NotEncodable {
                mechanism: BearerMechanism::XOAuth2,
                problem: EncodingProblem::LineTooLong
            }
        );
    }

    #[test]
    fn mechanism_names() {
        for (name, mechanism) in [
            ("XOAUTH2", Some(BearerMechanism::XOAuth2)),
            ("xoauth2", Some(BearerMechanism::XOAuth2)),
            ("OAuthBearer", Some(BearerMechanism::OAuthBearer)),
            ("PLAIN", None),
            ("", None),
        ] {
            assert_eq!(BearerMechanism::from_name(name), mechanism, "{name}");
        }
        assert_eq!(BearerMechanism::OAuthBearer.to_string(), "OAUTHBEARER");
    }

    #[test]
    fn tokens_stay_out_of_debug_and_errors() {
        let token = "ya29.secret-token-value";
        let (xoauth2, xoauth2_line) =
            AuthExchange::xoauth2("user@example.com", &Secret::new(token)).unwrap();
        let (bearer, bearer_line) =
            AuthExchange::oauthbearer("user@example.com", &Secret::new(token), "mx.example", 587)
                .unwrap();
        let mut failed = oauthbearer();
        failed.on_reply(reply(RFC7628_ERROR_CHALLENGE)).unwrap();
        let error = failed.on_reply(reply("535 5.7.8 invalid\r\n")).unwrap_err();
        for debug in [
            format!("{xoauth2:?}"),
            format!("{xoauth2_line:?}"),
            format!("{bearer:?}"),
            format!("{bearer_line:?}"),
            format!("{failed:?}"),
            format!("{error:?}"),
            error.to_string(),
        ] {
            assert!(!debug.contains("secret-token"), "{debug}");
            assert!(!debug.contains("t0k"), "{debug}");
            // Nor any of the encoded line: its first 20 characters are the
            // username's, so look further in.
            for line in [&xoauth2_line, &bearer_line] {
                let encoded = std::str::from_utf8(line.expose()).unwrap();
                assert!(!debug.contains(&encoded[30..60]), "{debug}");
            }
        }
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let password = "hunter2-secret";
        let (exchange, line) = AuthExchange::login("user", Secret::new(password));
        let (plain, plain_line) = AuthExchange::plain("user", &Secret::new(password)).unwrap();
        let mut encoded = Vec::new();
        tsubame_smtp_proto::sasl::encode_base64(password.as_bytes(), &mut encoded);
        let encoded = String::from_utf8(encoded).unwrap();
        for debug in [
            format!("{:?}", Secret::new(password)),
            format!("{exchange:?}"),
            format!("{line:?}"),
            format!("{plain:?}"),
            format!("{plain_line:?}"),
        ] {
            assert!(!debug.contains(password), "{debug}");
            assert!(!debug.contains(&encoded), "{debug}");
        }
        assert_eq!(format!("{:?}", Secret::new(password)), "***");
    }
}
