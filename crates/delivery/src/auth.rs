//! AUTH PLAIN (RFC 4616) and AUTH LOGIN (draft-murchison-sasl-login) client exchanges
//! over RFC 4954's AUTH command.
//!
//! Secrets stay out of `Debug` output and errors: passwords are [`Secret`]s and the
//! command lines that carry them are [`SecretBytes`].

use std::fmt;

use crate::reply::Reply;

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

/// Why authentication did not succeed. Carries the server's reply, never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication rejected: {} {}", .0.code, .0.text())]
    Rejected(Reply),
    #[error("unexpected reply during authentication: {} {}", .0.code, .0.text())]
    Unexpected(Reply),
    #[error("a username or password contains NUL, which SASL PLAIN cannot carry")]
    NulInCredentials,
}

/// What to do after a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// Write these bytes and wait for the next reply.
    Write(SecretBytes),
    /// Authenticated (235).
    Done,
}

/// One AUTH exchange. Start with [`AuthExchange::plain`] or [`AuthExchange::login`],
/// write the first bytes, then feed each reply to [`AuthExchange::on_reply`].
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
        tsubame_smtp_proto::sasl::encode_base64(&message, &mut line);
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

    pub fn on_reply(&mut self, reply: Reply) -> Result<AuthStep, AuthError> {
        let state = std::mem::replace(&mut self.state, AuthState::Finished);
        match (state, reply.code) {
            (AuthState::Plain | AuthState::LoginDone, 235) => Ok(AuthStep::Done),
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

fn encoded_line(bytes: &[u8]) -> SecretBytes {
    let mut line = Vec::with_capacity(bytes.len().div_ceil(3) * 4 + 2);
    tsubame_smtp_proto::sasl::encode_base64(bytes, &mut line);
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
