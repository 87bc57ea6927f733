//! Where access tokens come from: [`TokenSource`] and its three kinds.
//!
//! A source answers "a fresh token for this account, now". It does no caching: that is
//! [`crate::TokenCache`]'s job, which also makes sure one source is asked once at a
//! time per account.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::SystemRandom;
use ring::signature::RsaKeyPair;
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;

use crate::http::{Endpoint, HttpClient, HttpResponse};
use crate::jwt::{self, ASSERTION_LIFETIME_SECS, Claims};
use crate::token_file;
use crate::{AccessToken, GMAIL_SCOPE, Secret, TokenError, TokenKind, sanitize_peer_text};

/// Used when a token answer has no `expires_in` (RFC 6749 §5.1 only recommends it):
/// Google's access tokens live one hour. Should a token die sooner, the upstream's
/// rejection ([`crate::TokenCache::invalidate`]) gets a new one.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Longest lifetime believed from an answer: a day. A larger `expires_in` (or a
/// mistaken one in milliseconds) would keep a dead token for too long.
pub const TOKEN_LIFETIME_MAX: Duration = Duration::from_secs(24 * 3600);
/// Largest service-account key file read: Google's are about 2.3 KiB.
pub const KEY_FILE_BYTES_MAX: u64 = 64 * 1024;
/// The JWT-bearer grant type (RFC 7523 §2.1).
const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// Something that can mint an access token for an account. Implementations do blocking
/// I/O and are called from delivery threads, one call at a time per account.
pub trait TokenSource: Send + Sync + fmt::Debug {
    /// A new token for `account` (the address the upstream login is for), `now` being
    /// the current time (for JWT timestamps and the token's expiry).
    fn fetch(&self, account: &str, now: SystemTime) -> Result<AccessToken, TokenError>;
}

/// Where a [`RefreshToken`] source keeps its refresh token.
#[derive(Debug)]
enum RefreshTokenOrigin {
    /// Held in memory; a rotated token replaces it there.
    Inline(Mutex<Secret>),
    /// Read from this file at each refresh, so that running the authorize flow again
    /// takes effect without a restart; a rotated token is written back.
    File(PathBuf),
}

/// An installed-app OAuth client's refresh token, exchanged at the token endpoint
/// (`grant_type=refresh_token`, RFC 6749 §6). The account is fixed by the refresh
/// token; the `account` passed to [`TokenSource::fetch`] is not sent.
pub struct RefreshToken {
    client_id: String,
    client_secret: Secret,
    token_endpoint: Endpoint,
    refresh_token: RefreshTokenOrigin,
    http: HttpClient,
}

impl fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let origin = match &self.refresh_token {
            RefreshTokenOrigin::Inline(_) => "inline".to_string(),
            RefreshTokenOrigin::File(path) => path.display().to_string(),
        };
        f.debug_struct("RefreshToken")
            .field("client_id", &self.client_id)
            .field("token_endpoint", &self.token_endpoint)
            .field("refresh_token", &origin)
            .finish_non_exhaustive()
    }
}

impl RefreshToken {
    /// A source with the refresh token given inline.
    pub fn new(
        client_id: impl Into<String>,
        client_secret: Secret,
        token_endpoint: Endpoint,
        refresh_token: Secret,
        http: HttpClient,
    ) -> Self {
        Self {
            client_id: client_id.into(),
            client_secret,
            token_endpoint,
            refresh_token: RefreshTokenOrigin::Inline(Mutex::new(refresh_token)),
            http,
        }
    }

    /// A source that reads its refresh token from `path` (as written by
    /// [`crate::token_file::store`]) at each refresh.
    pub fn from_token_file(
        client_id: impl Into<String>,
        client_secret: Secret,
        token_endpoint: Endpoint,
        path: impl Into<PathBuf>,
        http: HttpClient,
    ) -> Self {
        Self {
            client_id: client_id.into(),
            client_secret,
            token_endpoint,
            refresh_token: RefreshTokenOrigin::File(path.into()),
            http,
        }
    }

    fn current_refresh_token(&self) -> Result<Secret, TokenError> {
        match &self.refresh_token {
            RefreshTokenOrigin::Inline(token) => {
                Ok(token.lock().unwrap_or_else(PoisonError::into_inner).clone())
            }
            RefreshTokenOrigin::File(path) => token_file::load(path),
        }
    }

    /// The endpoint issued a new refresh token (rotation, RFC 6749 §6): keep it, the
    /// old one may stop working.
    fn keep_rotated(&self, rotated: Secret) {
        match &self.refresh_token {
            RefreshTokenOrigin::Inline(token) => {
                *token.lock().unwrap_or_else(PoisonError::into_inner) = rotated;
            }
            RefreshTokenOrigin::File(path) => {
                if let Err(error) = token_file::store(path, &rotated) {
                    tracing::warn!(
                        file = %path.display(),
                        %error,
                        "the token endpoint issued a new refresh token and it could not be saved"
                    );
                }
            }
        }
    }
}

impl TokenSource for RefreshToken {
    fn fetch(&self, _account: &str, now: SystemTime) -> Result<AccessToken, TokenError> {
        let refresh_token = self.current_refresh_token()?;
        let response = self.http.post_form(
            &self.token_endpoint,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token.expose()),
                ("client_id", &self.client_id),
                ("client_secret", self.client_secret.expose()),
            ],
        )?;
        let answer = parse_token_answer(&response, &self.token_endpoint, &["invalid_grant"])?;
        if let Some(rotated) = answer.refresh_token.clone()
            && rotated != refresh_token
        {
            self.keep_rotated(rotated);
        }
        Ok(answer.access_token(now))
    }
}

/// The fields of Google's service-account key file that are used.
#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    client_email: Option<String>,
    private_key: Option<String>,
    private_key_id: Option<String>,
    token_uri: Option<String>,
}

/// A Google service account with domain-wide delegation: for each account it signs a
/// JWT assertion (RS256) whose `sub` is that account, and exchanges it at the token
/// endpoint (RFC 7523 §2.1).
pub struct ServiceAccount {
    client_email: String,
    key_id: String,
    key: RsaKeyPair,
    token_endpoint: Endpoint,
    scope: String,
    http: HttpClient,
    random: SystemRandom,
}

impl fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("key_id", &self.key_id)
            .field("token_endpoint", &self.token_endpoint)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl ServiceAccount {
    /// Reads the JSON key file Google issues for a service account.
    pub fn from_key_file(path: &Path, http: HttpClient) -> Result<Self, TokenError> {
        let text = token_file::read_bounded(path, KEY_FILE_BYTES_MAX, "service account key")?;
        Self::from_key_json(&text, http).map_err(|error| match error {
            TokenError::Configuration { reason } => {
                TokenError::configuration(format!("{}: {reason}", path.display()))
            }
            other => other,
        })
    }

    /// Parses a service-account key file's text. Errors name the field that is wrong,
    /// never the key.
    pub fn from_key_json(text: &str, http: HttpClient) -> Result<Self, TokenError> {
        // serde_json's messages may quote the input; only the position is reported.
        let file: KeyFile = serde_json::from_str(text).map_err(|error| {
            TokenError::configuration(format!(
                "not a service account key file (JSON {:?} error at line {}, column {})",
                error.classify(),
                error.line(),
                error.column()
            ))
        })?;
        let missing =
            |field: &str| TokenError::configuration(format!("the key file has no {field:?}"));
        if file.kind.as_deref() != Some("service_account") {
            return Err(TokenError::configuration(
                "the key file's \"type\" is not \"service_account\"",
            ));
        }
        let client_email = file.client_email.ok_or_else(|| missing("client_email"))?;
        let key_id = file
            .private_key_id
            .ok_or_else(|| missing("private_key_id"))?;
        let pem = Secret::new(file.private_key.ok_or_else(|| missing("private_key"))?);
        let token_uri = file.token_uri.ok_or_else(|| missing("token_uri"))?;
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.expose().as_bytes()).map_err(|_| {
            TokenError::configuration("the key file's private_key is not a PKCS#8 PEM key")
        })?;
        let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).map_err(|rejected| {
            TokenError::configuration(format!(
                "the key file's private_key is not a usable RSA key: {rejected}"
            ))
        })?;
        Ok(Self {
            client_email,
            key_id,
            key,
            token_endpoint: Endpoint::parse(&token_uri)?,
            scope: GMAIL_SCOPE.to_string(),
            http,
            random: SystemRandom::new(),
        })
    }

    /// Posts assertions to `endpoint` (also their `aud`) instead of the key file's
    /// `token_uri`.
    pub fn with_token_endpoint(mut self, endpoint: Endpoint) -> Self {
        self.token_endpoint = endpoint;
        self
    }

    /// Asks for `scope` instead of [`GMAIL_SCOPE`].
    pub fn with_scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = scope.into();
        self
    }

    /// The service account's own address (the JWT's `iss`).
    pub fn client_email(&self) -> &str {
        &self.client_email
    }

    /// The signed assertion for `account` at `now`.
    fn assertion(&self, account: &str, now: SystemTime) -> Result<String, TokenError> {
        let issued_at = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| TokenError::temporary("the system clock is before 1970"))?
            .as_secs();
        let claims = Claims {
            iss: &self.client_email,
            sub: account,
            scope: &self.scope,
            aud: self.token_endpoint.url().as_str(),
            iat: issued_at,
            exp: issued_at + ASSERTION_LIFETIME_SECS,
        };
        jwt::sign(&self.key, &self.key_id, &claims, &self.random)
    }
}

impl TokenSource for ServiceAccount {
    fn fetch(&self, account: &str, now: SystemTime) -> Result<AccessToken, TokenError> {
        let assertion = self.assertion(account, now)?;
        let response = self.http.post_form(
            &self.token_endpoint,
            &[("grant_type", JWT_BEARER_GRANT), ("assertion", &assertion)],
        )?;
        // Google answers unauthorized_client when the account's domain has not granted
        // the service account delegation for the scope, invalid_grant for an unknown
        // account or a bad assertion: both need an administrator.
        let answer = parse_token_answer(
            &response,
            &self.token_endpoint,
            &["invalid_grant", "unauthorized_client"],
        )
        .map_err(|error| match error {
            TokenError::InvalidGrant { reason } => TokenError::InvalidGrant {
                reason: format!("{reason} (for {account} as {})", self.client_email),
            },
            other => other,
        })?;
        Ok(answer.access_token(now))
    }
}

/// A static password (a Google app password): no HTTP, the same secret every time, so
/// callers treat all sources alike. Its token has [`TokenKind::Password`] and no
/// expiry.
pub struct StaticPassword {
    password: Secret,
}

impl fmt::Debug for StaticPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticPassword").finish_non_exhaustive()
    }
}

impl StaticPassword {
    pub fn new(password: Secret) -> Self {
        Self { password }
    }
}

impl TokenSource for StaticPassword {
    fn fetch(&self, _account: &str, _now: SystemTime) -> Result<AccessToken, TokenError> {
        Ok(AccessToken::new(
            self.password.clone(),
            TokenKind::Password,
            None,
        ))
    }
}

/// A successful token answer (RFC 6749 §5.1).
#[derive(Debug)]
pub(crate) struct TokenAnswer {
    access_token: Secret,
    /// Clamped to [`TOKEN_LIFETIME_MAX`].
    lifetime: Duration,
    pub(crate) refresh_token: Option<Secret>,
}

impl TokenAnswer {
    pub(crate) fn access_token(&self, now: SystemTime) -> AccessToken {
        AccessToken::new(
            self.access_token.clone(),
            TokenKind::Bearer,
            Some(now + self.lifetime),
        )
    }
}

#[derive(Deserialize)]
struct SuccessJson {
    access_token: Option<String>,
    expires_in: Option<serde_json::Value>,
    token_type: Option<String>,
    refresh_token: Option<String>,
}

#[derive(Deserialize)]
struct ErrorJson {
    error: Option<String>,
    error_description: Option<String>,
}

/// Reads a token endpoint's answer: a token on 200, else an error classified by the
/// OAuth `error` code (RFC 6749 §5.2): a code in `invalid_grant_codes` means a person
/// has to authorise again, `invalid_client` means the client id or secret is wrong,
/// anything else (and any 5xx, or an answer that is not JSON) is temporary.
pub(crate) fn parse_token_answer(
    response: &HttpResponse,
    endpoint: &Endpoint,
    invalid_grant_codes: &[&str],
) -> Result<TokenAnswer, TokenError> {
    if response.status == 200 {
        let json: SuccessJson = serde_json::from_slice(&response.body).map_err(|error| {
            TokenError::temporary(format!(
                "{endpoint} answered 200 with a body that is not a token answer (JSON {:?} error at line {}, column {})",
                error.classify(),
                error.line(),
                error.column()
            ))
        })?;
        let access_token = json
            .access_token
            .filter(|token| !token.is_empty())
            .ok_or_else(|| {
                TokenError::temporary(format!("{endpoint} answered 200 without an access_token"))
            })?;
        if let Some(kind) = &json.token_type
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(TokenError::temporary(format!(
                "{endpoint} issued a token of type {:?}, not Bearer",
                sanitize_peer_text(kind)
            )));
        }
        // Google sends a number; some servers send a string of digits.
        let lifetime_secs = match &json.expires_in {
            None | Some(serde_json::Value::Null) => DEFAULT_TOKEN_LIFETIME.as_secs(),
            Some(serde_json::Value::Number(number)) => number.as_u64().ok_or_else(|| {
                TokenError::temporary(format!("{endpoint}: expires_in is not a whole number"))
            })?,
            Some(serde_json::Value::String(text)) => text.parse().map_err(|_| {
                TokenError::temporary(format!("{endpoint}: expires_in is not a whole number"))
            })?,
            Some(_) => {
                return Err(TokenError::temporary(format!(
                    "{endpoint}: expires_in is not a number"
                )));
            }
        };
        return Ok(TokenAnswer {
            access_token: Secret::new(access_token),
            lifetime: Duration::from_secs(lifetime_secs).min(TOKEN_LIFETIME_MAX),
            refresh_token: json
                .refresh_token
                .filter(|token| !token.is_empty())
                .map(Secret::new),
        });
    }

    let status = response.status;
    let error: Option<ErrorJson> = serde_json::from_slice(&response.body).ok();
    let (code, description) = match error {
        Some(ErrorJson {
            error: Some(code),
            error_description,
        }) => (Some(code), error_description),
        _ => (None, None),
    };
    let mut reason = format!("{endpoint} answered {status}");
    if let Some(code) = &code {
        reason.push_str(&format!(": {}", sanitize_peer_text(code)));
    }
    if let Some(description) = &description {
        reason.push_str(&format!(" ({})", sanitize_peer_text(description)));
    }
    match code.as_deref() {
        Some(code) if (400..500).contains(&status) && invalid_grant_codes.contains(&code) => {
            Err(TokenError::InvalidGrant { reason })
        }
        Some("invalid_client") if (400..500).contains(&status) => Err(TokenError::configuration(
            format!("{reason}: check the client id and secret"),
        )),
        _ => Err(TokenError::temporary(reason)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Endpoint {
        Endpoint::parse("http://127.0.0.1:9/token").unwrap()
    }

    fn answer(status: u16, body: &str) -> Result<TokenAnswer, TokenError> {
        parse_token_answer(
            &HttpResponse {
                status,
                body: body.as_bytes().to_vec(),
            },
            &endpoint(),
            &["invalid_grant"],
        )
    }

    #[test]
    fn token_answers() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        let ok = answer(
            200,
            r#"{"access_token":"ya29.a","expires_in":3599,"token_type":"Bearer","scope":"https://mail.google.com/"}"#,
        )
        .unwrap();
        let token = ok.access_token(now);
        assert_eq!(token.secret(), "ya29.a");
        assert_eq!(token.kind(), TokenKind::Bearer);
        assert_eq!(token.expires_at(), Some(now + Duration::from_secs(3599)));
        assert!(ok.refresh_token.is_none());

        let lifetimes = [
            (r#"{"access_token":"t","expires_in":"60"}"#, 60),
            (r#"{"access_token":"t"}"#, DEFAULT_TOKEN_LIFETIME.as_secs()),
            (
                r#"{"access_token":"t","expires_in":99999999}"#,
                TOKEN_LIFETIME_MAX.as_secs(),
            ),
        ];
        for (body, want) in lifetimes {
            let token = answer(200, body).unwrap().access_token(now);
            assert_eq!(
                token.expires_at(),
                Some(now + Duration::from_secs(want)),
                "{body}"
            );
        }
        let with_refresh = answer(200, r#"{"access_token":"t","refresh_token":"1//r"}"#).unwrap();
        assert_eq!(with_refresh.refresh_token, Some(Secret::new("1//r")));
    }

    #[test]
    fn bad_token_answers_are_temporary() {
        let bodies = [
            "<html>",
            r#"{"expires_in":3600}"#,
            r#"{"access_token":""}"#,
            r#"{"access_token":"t","token_type":"MAC"}"#,
            r#"{"access_token":"t","expires_in":-5}"#,
            r#"{"access_token":"t","expires_in":[1]}"#,
        ];
        for body in bodies {
            let error = answer(200, body).unwrap_err();
            assert!(
                matches!(error, TokenError::Temporary { .. }),
                "{body}: {error}"
            );
        }
    }

    #[test]
    fn error_answers_are_classified() {
        let cases = [
            (
                400,
                r#"{"error":"invalid_grant","error_description":"Token has been expired or revoked."}"#,
                "InvalidGrant",
            ),
            (401, r#"{"error":"invalid_client"}"#, "Configuration"),
            (400, r#"{"error":"unauthorized_client"}"#, "Temporary"),
            (500, r#"{"error":"invalid_grant"}"#, "Temporary"),
            (503, "<html>busy</html>", "Temporary"),
            (429, r#"{"error":"rate_limit_exceeded"}"#, "Temporary"),
        ];
        for (status, body, want) in cases {
            let error = answer(status, body).unwrap_err();
            let got = match error {
                TokenError::InvalidGrant { .. } => "InvalidGrant",
                TokenError::Temporary { .. } => "Temporary",
                TokenError::Configuration { .. } => "Configuration",
            };
            assert_eq!(got, want, "{status} {body}");
        }
        let error = answer(
            400,
            r#"{"error":"invalid_grant","error_description":"Token has been expired or revoked."}"#,
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "re-authorisation needed: http://127.0.0.1:9/token answered 400: invalid_grant \
             (Token has been expired or revoked.)"
        );
    }

    #[test]
    fn key_file_errors_do_not_show_the_key() {
        let http = HttpClient::new(crate::HttpSettings::default()).unwrap();
        let cases = [
            "{",
            r#"{"type":"authorized_user"}"#,
            r#"{"type":"service_account","client_email":"a@b","private_key_id":"k","token_uri":"https://o/t"}"#,
            r#"{"type":"service_account","client_email":"a@b","private_key_id":"k","token_uri":"https://o/t","private_key":"-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END PRIVATE KEY-----\n"}"#,
            r#"{"type":"service_account","client_email":"a@b","private_key_id":"k","token_uri":"https://o/t","private_key":"secret-key-bytes"}"#,
        ];
        for text in cases {
            let error = ServiceAccount::from_key_json(text, http.clone()).unwrap_err();
            assert!(matches!(error, TokenError::Configuration { .. }), "{error}");
            let shown = error.to_string();
            assert!(!shown.contains("c2VjcmV0"), "{shown}");
            assert!(!shown.contains("secret-key-bytes"), "{shown}");
        }
    }

    #[test]
    fn static_password_returns_its_secret() {
        let source = StaticPassword::new(Secret::new("abcd efgh ijkl mnop"));
        let token = source.fetch("someone@example.com", UNIX_EPOCH).unwrap();
        assert_eq!(token.secret(), "abcd efgh ijkl mnop");
        assert_eq!(token.kind(), TokenKind::Password);
        assert_eq!(token.expires_at(), None);
        assert!(!format!("{source:?}").contains("abcd"));
    }
}
