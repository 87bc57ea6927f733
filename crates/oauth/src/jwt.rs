//! The JWT bearer assertion of a service account (RFC 7523 §2.1, Google's "Using OAuth
//! 2.0 for Server to Server Applications"): a JWS in compact serialisation (RFC 7515
//! §7.1), RS256 (RFC 7518 §3.3: RSASSA-PKCS1-v1_5 with SHA-256).

use ring::rand::SecureRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use serde::Serialize;

use crate::TokenError;
use crate::base64url;

/// How long an assertion is valid: Google accepts at most one hour.
pub(crate) const ASSERTION_LIFETIME_SECS: u64 = 3600;

#[derive(Debug, Serialize)]
struct Header<'a> {
    alg: &'static str,
    typ: &'static str,
    kid: &'a str,
}

/// The claims Google reads (RFC 7519 §4.1 names; `scope` is Google's).
#[derive(Debug, Serialize, PartialEq, Eq)]
pub(crate) struct Claims<'a> {
    /// The service account's e-mail address.
    pub iss: &'a str,
    /// The account to act for (domain-wide delegation).
    pub sub: &'a str,
    pub scope: &'a str,
    /// The token endpoint the assertion is posted to.
    pub aud: &'a str,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// `iat + ASSERTION_LIFETIME_SECS`.
    pub exp: u64,
}

/// `base64url(header) "." base64url(claims)`, the JWS signing input.
fn signing_input(key_id: &str, claims: &Claims<'_>) -> Result<String, TokenError> {
    let header = Header {
        alg: "RS256",
        typ: "JWT",
        kid: key_id,
    };
    Ok(format!(
        "{}.{}",
        encode_json(&header)?,
        encode_json(claims)?
    ))
}

/// A signed assertion: `signing input "." base64url(signature)`.
pub(crate) fn sign(
    key: &RsaKeyPair,
    key_id: &str,
    claims: &Claims<'_>,
    random: &dyn SecureRandom,
) -> Result<String, TokenError> {
    let input = signing_input(key_id, claims)?;
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(&RSA_PKCS1_SHA256, random, input.as_bytes(), &mut signature)
        .map_err(|_| {
            TokenError::configuration("signing the JWT with the service account key failed")
        })?;
    Ok(format!("{input}.{}", base64url::encode(&signature)))
}

fn encode_json(value: &impl Serialize) -> Result<String, TokenError> {
    serde_json::to_string(value)
        .map(|json| base64url::encode(json.as_bytes()))
        .map_err(|error| TokenError::configuration(format!("encoding the JWT: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signing_input_is_base64url_json_without_padding() {
        let claims = Claims {
            iss: "relay@project.iam.gserviceaccount.com",
            sub: "printer@example.com",
            scope: "https://mail.google.com/",
            aud: "https://oauth2.googleapis.com/token",
            iat: 1_700_000_000,
            exp: 1_700_003_600,
        };
        let input = signing_input("abc123", &claims).unwrap();
        let (header, body) = input.split_once('.').unwrap();
        assert!(!input.contains('='), "{input}");
        assert!(!input.contains('+') && !input.contains('/'), "{input}");
        // {"alg":"RS256","typ":"JWT","kid":"abc123"}
        assert_eq!(
            header,
            "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImFiYzEyMyJ9"
        );
        assert_eq!(
            body,
            base64url::encode(
                br#"{"iss":"relay@project.iam.gserviceaccount.com","sub":"printer@example.com","scope":"https://mail.google.com/","aud":"https://oauth2.googleapis.com/token","iat":1700000000,"exp":1700003600}"#
            )
        );
    }
}
