//! The one-time authorisation of an installed ("desktop") OAuth client, on a server
//! without a browser: the authorisation-code grant (RFC 6749 §4.1) with PKCE (RFC
//! 7636) and a loopback redirect (RFC 8252 §7.3).
//!
//! 1. [`Authorization::new`] makes the PKCE verifier and the `state` value (random,
//!    from `ring`'s `SystemRandom`) for a redirect URI, usually that of a
//!    [`LoopbackReceiver`] (`http://127.0.0.1:PORT/`).
//! 2. [`Authorization::consent_url`] is the page the person opens in a browser, signed
//!    in as the account. `access_type=offline` and `prompt=consent` make Google issue
//!    a refresh token every time.
//! 3. The browser is redirected to the loopback address with `code` and `state`:
//!    [`LoopbackReceiver::receive`] takes it when the browser runs on this machine (or
//!    through an SSH tunnel to it). When the browser is elsewhere, the redirect fails to
//!    load there and the person pastes the address (or only the code);
//!    [`Authorization::code_from_paste`] reads either. (Google removed the
//!    copy-the-code "out of band" redirect in 2022, so the redirect URI is the loopback
//!    one in both cases.)
//! 4. [`Authorization::exchange`] trades the code for tokens at the token endpoint;
//!    the refresh token goes to [`crate::token_file::store`].

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use url::Url;

use crate::http::{Endpoint, HttpClient};
use crate::source::parse_token_answer;
use crate::{AccessToken, GMAIL_SCOPE, Secret, TokenError, base64url, sanitize_peer_text};

/// Random bytes in a PKCE verifier: 32, giving the 43-character verifier RFC 7636 §4.1
/// recommends (256 bits of entropy).
const VERIFIER_RANDOM_BYTES: usize = 32;
/// Random bytes in `state`: 128 bits, unguessable for a cross-site request forgery.
const STATE_RANDOM_BYTES: usize = 16;
/// Largest request head the loopback receiver reads: a redirect with a code is under
/// 1 KiB; browsers send a few hundred bytes of headers.
pub const REDIRECT_REQUEST_BYTES_MAX: usize = 16 * 1024;
/// How long the receiver waits for one connection's request to arrive.
const REDIRECT_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests without a code (a favicon, a probe) answered 404 before the receiver gives
/// up.
const STRAY_REQUESTS_MAX: usize = 32;
/// How often the receiver looks for a connection while waiting.
const ACCEPT_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Longest authorisation code accepted from a paste or redirect: Google's are about
/// 70 characters.
const CODE_BYTES_MAX: usize = 2048;

/// Why the authorisation did not produce a code.
#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    #[error("no redirect arrived within {} s", .0.as_secs())]
    Timeout(Duration),
    /// The redirect's `state` is not the one sent: a forged or stale redirect.
    #[error("the redirect's state does not match this authorisation (a stale or forged redirect)")]
    StateMismatch,
    /// The authorisation server reported an error (`access_denied` when the person
    /// clicked Cancel).
    #[error("authorisation refused: {0}")]
    Denied(String),
    /// What was pasted is neither a code nor a redirected URL with one.
    #[error("{0}")]
    InvalidPaste(&'static str),
    #[error("too many requests to the redirect address without a code")]
    TooManyStrayRequests,
    #[error("loopback redirect receiver: {0}")]
    Io(#[from] io::Error),
}

/// A PKCE verifier and its S256 challenge (RFC 7636 §4.1-4.2).
#[derive(Clone)]
pub struct Pkce {
    verifier: Secret,
    challenge: String,
}

impl fmt::Debug for Pkce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkce")
            .field("challenge", &self.challenge)
            .finish_non_exhaustive()
    }
}

impl Pkce {
    /// A new random verifier.
    pub fn generate(random: &dyn SecureRandom) -> Result<Self, TokenError> {
        Ok(Self::from_verifier(Secret::new(random_base64url(
            random,
            VERIFIER_RANDOM_BYTES,
        )?)))
    }

    /// The challenge for a given verifier: `BASE64URL(SHA256(verifier))`.
    pub fn from_verifier(verifier: Secret) -> Self {
        let challenge = base64url::encode(digest(&SHA256, verifier.expose().as_bytes()).as_ref());
        Self {
            verifier,
            challenge,
        }
    }

    pub fn verifier(&self) -> &Secret {
        &self.verifier
    }

    pub fn challenge(&self) -> &str {
        &self.challenge
    }
}

fn random_base64url(random: &dyn SecureRandom, length: usize) -> Result<String, TokenError> {
    let mut bytes = vec![0u8; length];
    random
        .fill(&mut bytes)
        .map_err(|_| TokenError::temporary("the system's random number generator failed"))?;
    Ok(base64url::encode(&bytes))
}

/// One authorisation in progress: who asks, for whom, where the browser comes back to,
/// and the one-time values that tie the answer to this request.
#[derive(Debug, Clone)]
pub struct Authorization {
    client_id: String,
    account: String,
    scope: String,
    redirect_uri: String,
    state: String,
    pkce: Pkce,
}

/// What the code exchange yields.
#[derive(Debug, Clone)]
pub struct Authorized {
    /// Long-lived; store it with [`crate::token_file::store`].
    pub refresh_token: Secret,
    /// Works for about an hour; proves the grant worked.
    pub access_token: AccessToken,
}

impl Authorization {
    /// A new authorisation for `account` (sent as `login_hint`) with fresh random
    /// `state` and PKCE verifier, for the Gmail scope.
    pub fn new(
        client_id: impl Into<String>,
        account: impl Into<String>,
        redirect_uri: impl Into<String>,
    ) -> Result<Self, TokenError> {
        let random = SystemRandom::new();
        Ok(Self {
            client_id: client_id.into(),
            account: account.into(),
            scope: GMAIL_SCOPE.to_string(),
            redirect_uri: redirect_uri.into(),
            state: random_base64url(&random, STATE_RANDOM_BYTES)?,
            pkce: Pkce::generate(&random)?,
        })
    }

    /// Asks for `scope` instead of the Gmail scope.
    pub fn with_scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = scope.into();
        self
    }

    /// Replaces the random `state` and PKCE values (for tests).
    pub fn with_state_and_pkce(mut self, state: impl Into<String>, pkce: Pkce) -> Self {
        self.state = state.into();
        self.pkce = pkce;
        self
    }

    pub fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    pub fn state(&self) -> &str {
        &self.state
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    /// The consent page at `auth_endpoint` (RFC 6749 §4.1.1, RFC 7636 §4.3, and
    /// Google's `access_type`, `prompt` and `login_hint`).
    pub fn consent_url(&self, auth_endpoint: &Url) -> Url {
        let mut url = auth_endpoint.clone();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.client_id)
            .append_pair("redirect_uri", &self.redirect_uri)
            .append_pair("scope", &self.scope)
            .append_pair("access_type", "offline")
            .append_pair("prompt", "consent")
            .append_pair("login_hint", &self.account)
            .append_pair("state", &self.state)
            .append_pair("code_challenge", self.pkce.challenge())
            .append_pair("code_challenge_method", "S256");
        url
    }

    /// The code from what a person pasted: the redirected address from the browser's
    /// address bar, its query, or the bare code. A pasted `state` must be this
    /// authorisation's.
    pub fn code_from_paste(&self, input: &str) -> Result<Secret, AuthorizeError> {
        let pasted = parse_pasted(input)?;
        match pasted.state {
            Some(state) if state != self.state => Err(AuthorizeError::StateMismatch),
            _ => Ok(pasted.code),
        }
    }

    /// Trades `code` for tokens (RFC 6749 §4.1.3 with the PKCE verifier). An answer
    /// without a refresh token is an error: the grant would die with its first
    /// access token.
    pub fn exchange(
        &self,
        http: &HttpClient,
        token_endpoint: &Endpoint,
        client_secret: &Secret,
        code: &Secret,
        now: std::time::SystemTime,
    ) -> Result<Authorized, TokenError> {
        let response = http.post_form(
            token_endpoint,
            &[
                ("grant_type", "authorization_code"),
                ("code", code.expose()),
                ("code_verifier", self.pkce.verifier().expose()),
                ("redirect_uri", &self.redirect_uri),
                ("client_id", &self.client_id),
                ("client_secret", client_secret.expose()),
            ],
        )?;
        let answer = parse_token_answer(&response, token_endpoint, &["invalid_grant"])?;
        let refresh_token = answer.refresh_token.clone().ok_or_else(|| {
            TokenError::configuration(format!(
                "{token_endpoint} issued no refresh token; remove the app's access at \
                 https://myaccount.google.com/permissions and authorise again"
            ))
        })?;
        Ok(Authorized {
            refresh_token,
            access_token: answer.access_token(now),
        })
    }
}

/// A code read from a paste, with the `state` that came with it, if any.
#[derive(Debug)]
pub struct Pasted {
    pub code: Secret,
    pub state: Option<String>,
}

/// Reads a pasted redirect address (`http://127.0.0.1:PORT/?state=...&code=...`), its
/// query alone, or a bare code.
pub fn parse_pasted(input: &str) -> Result<Pasted, AuthorizeError> {
    let input = input.trim();
    if input.is_empty() {
        return Err(AuthorizeError::InvalidPaste("nothing was pasted"));
    }
    if input.contains("code=") || input.contains("error=") {
        let query = match Url::parse(input) {
            Ok(url) => url.query().unwrap_or_default().to_string(),
            Err(_) => input
                .split_once('?')
                .map_or(input, |(_, query)| query)
                .to_string(),
        };
        return parse_redirect_query(&query)?.ok_or(AuthorizeError::InvalidPaste(
            "the pasted address has no code in it",
        ));
    }
    if input.contains(['?', '&', '=', ':']) {
        return Err(AuthorizeError::InvalidPaste(
            "the pasted address has no code in it",
        ));
    }
    // A bare code. Google's contain '/', which some copy paths percent-encode.
    let code = if input.contains('%') {
        url::form_urlencoded::parse(format!("c={input}").as_bytes())
            .next()
            .map(|(_, value)| value.into_owned())
            .unwrap_or_default()
    } else {
        input.to_string()
    };
    check_code(&code)?;
    Ok(Pasted {
        code: Secret::new(code),
        state: None,
    })
}

fn check_code(code: &str) -> Result<(), AuthorizeError> {
    if code.is_empty() {
        return Err(AuthorizeError::InvalidPaste("the code is empty"));
    }
    if code.len() > CODE_BYTES_MAX {
        return Err(AuthorizeError::InvalidPaste(
            "that is too long to be a code",
        ));
    }
    if !code.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err(AuthorizeError::InvalidPaste(
            "a code has no spaces or other characters than printable ASCII; paste the \
             whole address from the browser's address bar, or only the code",
        ));
    }
    Ok(())
}

/// The code and state of a redirect's query, `None` when it has neither a code nor an
/// error, [`AuthorizeError::Denied`] for an `error`.
fn parse_redirect_query(query: &str) -> Result<Option<Pasted>, AuthorizeError> {
    let mut code = None;
    let mut state = None;
    let mut error = None;
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            "code" => code = Some(value.into_owned()),
            "state" => state = Some(value.into_owned()),
            "error" => error = Some(value.into_owned()),
            _ => {}
        }
    }
    if let Some(error) = error {
        return Err(AuthorizeError::Denied(sanitize_peer_text(&error)));
    }
    let Some(code) = code else {
        return Ok(None);
    };
    check_code(&code)?;
    Ok(Some(Pasted {
        code: Secret::new(code),
        state,
    }))
}

/// Receives the browser's redirect on `http://127.0.0.1:PORT/` (RFC 8252 §7.3), on a
/// port the system picks. Bound to the loopback address only, so only this machine
/// (or an SSH tunnel to it) reaches it.
#[derive(Debug)]
pub struct LoopbackReceiver {
    listener: TcpListener,
    address: SocketAddr,
}

/// The page the browser shows after the redirect.
const AUTHORISED_PAGE: &str = "<!doctype html><html><head><meta charset=\"utf-8\"><title>tsubame</title></head>\
    <body><p>tsubame: authorised, you can close this tab.</p></body></html>\n";

impl LoopbackReceiver {
    pub fn bind() -> io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let address = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        Ok(Self { listener, address })
    }

    /// `http://127.0.0.1:PORT/`
    pub fn redirect_uri(&self) -> String {
        format!("http://{}/", self.address)
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Waits up to `timeout` for the redirect and returns its code after checking its
    /// `state`. Requests without a code or error (a favicon) get 404 and are ignored.
    pub fn receive(
        &self,
        expected_state: &str,
        timeout: Duration,
    ) -> Result<Secret, AuthorizeError> {
        let deadline = Instant::now() + timeout;
        let mut stray_requests = 0;
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(AuthorizeError::Timeout(timeout));
                    }
                    std::thread::sleep(ACCEPT_POLL_INTERVAL);
                    continue;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error.into()),
            };
            match handle_redirect(stream, expected_state) {
                Ok(Some(code)) => return Ok(code),
                Ok(None) => {
                    stray_requests += 1;
                    if stray_requests > STRAY_REQUESTS_MAX {
                        return Err(AuthorizeError::TooManyStrayRequests);
                    }
                }
                Err(AuthorizeError::Io(error)) => {
                    // One broken connection (a probe that hung up) is not the end.
                    tracing::debug!(%error, "loopback redirect: a connection failed");
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// Reads one request from `stream` and answers it. `Some(code)` for the redirect.
fn handle_redirect(
    mut stream: TcpStream,
    expected_state: &str,
) -> Result<Option<Secret>, AuthorizeError> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(REDIRECT_READ_TIMEOUT))?;
    stream.set_write_timeout(Some(REDIRECT_READ_TIMEOUT))?;
    let mut head = Vec::new();
    let mut chunk = [0u8; 2048];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        if head.len() > REDIRECT_REQUEST_BYTES_MAX {
            respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "too large",
            )?;
            return Ok(None);
        }
        let count = stream.read(&mut chunk)?;
        if count == 0 {
            return Ok(None);
        }
        head.extend_from_slice(chunk.get(..count).unwrap_or_default());
    }
    let line_end = head
        .windows(2)
        .position(|window| window == b"\r\n")
        .unwrap_or(0);
    let request_line =
        String::from_utf8_lossy(head.get(..line_end).unwrap_or_default()).into_owned();
    let mut parts = request_line.split(' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if method != "GET" {
        respond(&mut stream, "405 Method Not Allowed", "only GET")?;
        return Ok(None);
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != "/" {
        respond(&mut stream, "404 Not Found", "not found")?;
        return Ok(None);
    }
    match parse_redirect_query(query) {
        Ok(Some(pasted)) if pasted.state.as_deref() == Some(expected_state) => {
            respond_html(&mut stream, "200 OK", AUTHORISED_PAGE)?;
            Ok(Some(pasted.code))
        }
        Ok(Some(_)) => {
            respond(
                &mut stream,
                "400 Bad Request",
                "tsubame: the state does not match; start again",
            )?;
            Err(AuthorizeError::StateMismatch)
        }
        Ok(None) => {
            respond(&mut stream, "404 Not Found", "not found")?;
            Ok(None)
        }
        Err(error @ AuthorizeError::Denied(_)) => {
            respond(
                &mut stream,
                "200 OK",
                "tsubame: authorisation refused; you can close this tab",
            )?;
            Err(error)
        }
        Err(error) => {
            respond(
                &mut stream,
                "400 Bad Request",
                "tsubame: no usable code in this request",
            )?;
            Err(error)
        }
    }
}

fn respond(stream: &mut TcpStream, status: &str, text: &str) -> io::Result<()> {
    write_response(
        stream,
        status,
        "text/plain; charset=utf-8",
        &format!("{text}\n"),
    )
}

fn respond_html(stream: &mut TcpStream, status: &str, html: &str) -> io::Result<()> {
    write_response(stream, status, "text/html; charset=utf-8", html)
}

fn write_response(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_rfc_7636_appendix_b() {
        let pkce = Pkce::from_verifier(Secret::new("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"));
        assert_eq!(
            pkce.challenge(),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn generated_verifiers_are_43_unreserved_characters() {
        let random = SystemRandom::new();
        let one = Pkce::generate(&random).unwrap();
        let two = Pkce::generate(&random).unwrap();
        assert_eq!(one.verifier().expose().len(), 43);
        assert!(
            one.verifier()
                .expose()
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
        );
        assert_ne!(one.verifier(), two.verifier());
        assert!(!format!("{one:?}").contains(one.verifier().expose()));
    }

    fn authorization() -> Authorization {
        Authorization::new(
            "123.apps.googleusercontent.com",
            "printer@example.com",
            "http://127.0.0.1:8085/",
        )
        .unwrap()
        .with_state_and_pkce(
            "st4te",
            Pkce::from_verifier(Secret::new("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")),
        )
    }

    #[test]
    fn consent_url() {
        let url = authorization().consent_url(&Url::parse(crate::GOOGLE_AUTH_ENDPOINT).unwrap());
        assert_eq!(
            url.as_str(),
            "https://accounts.google.com/o/oauth2/v2/auth?response_type=code\
             &client_id=123.apps.googleusercontent.com\
             &redirect_uri=http%3A%2F%2F127.0.0.1%3A8085%2F\
             &scope=https%3A%2F%2Fmail.google.com%2F\
             &access_type=offline&prompt=consent\
             &login_hint=printer%40example.com&state=st4te\
             &code_challenge=E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM\
             &code_challenge_method=S256"
        );
    }

    #[test]
    fn pasted_codes_and_addresses() {
        let authorization = authorization();
        let good = [
            ("4/0AeaYSHx-abc_DEF", "4/0AeaYSHx-abc_DEF"),
            ("  4/0AeaYSHx-abc  \n", "4/0AeaYSHx-abc"),
            ("4%2F0AeaYSHx", "4/0AeaYSHx"),
            (
                "http://127.0.0.1:8085/?state=st4te&code=4/0AeaY&scope=https://mail.google.com/",
                "4/0AeaY",
            ),
            (
                "http://127.0.0.1:8085/?state=st4te&code=4%2F0AeaY&scope=https%3A%2F%2Fmail.google.com%2F",
                "4/0AeaY",
            ),
            ("127.0.0.1:8085/?code=4/x&state=st4te", "4/x"),
            ("?code=4/x", "4/x"),
            ("code=4/x&scope=y", "4/x"),
        ];
        for (input, want) in good {
            let code = authorization.code_from_paste(input);
            assert_eq!(
                code.map(|code| code.expose().to_string()).ok().as_deref(),
                Some(want),
                "{input:?}"
            );
        }
        let bad = [
            "",
            "two words",
            "http://127.0.0.1:8085/?state=st4te",
            "http://127.0.0.1:8085/?state=other&code=4/x",
            "http://127.0.0.1:8085/?error=access_denied&state=st4te",
            "http://127.0.0.1:8085/?code=&state=st4te",
        ];
        for input in bad {
            assert!(authorization.code_from_paste(input).is_err(), "{input:?}");
        }
        assert!(matches!(
            authorization.code_from_paste("http://127.0.0.1:8085/?state=other&code=4/x"),
            Err(AuthorizeError::StateMismatch)
        ));
        assert!(matches!(
            authorization.code_from_paste("http://127.0.0.1:8085/?error=access_denied"),
            Err(AuthorizeError::Denied(error)) if error == "access_denied"
        ));
    }

    fn get(address: SocketAddr, target: &str) -> String {
        let mut stream = TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(stream, "GET {target} HTTP/1.1\r\nHost: {address}\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    #[test]
    fn loopback_receiver_takes_the_redirect_and_ignores_strays() {
        let receiver = LoopbackReceiver::bind().unwrap();
        assert!(receiver.redirect_uri().starts_with("http://127.0.0.1:"));
        let address = receiver.address();
        let browser = std::thread::spawn(move || {
            let favicon = get(address, "/favicon.ico");
            let bare = get(address, "/");
            let redirect = get(address, "/?state=st4te&code=4%2F0Ab&scope=x");
            (favicon, bare, redirect)
        });
        let code = receiver.receive("st4te", Duration::from_secs(20)).unwrap();
        assert_eq!(code.expose(), "4/0Ab");
        let (favicon, bare, redirect) = browser.join().unwrap();
        assert!(favicon.starts_with("HTTP/1.1 404"), "{favicon}");
        assert!(bare.starts_with("HTTP/1.1 404"), "{bare}");
        assert!(redirect.starts_with("HTTP/1.1 200"), "{redirect}");
        assert!(
            redirect.contains("tsubame: authorised, you can close this tab"),
            "{redirect}"
        );
    }

    #[test]
    fn loopback_receiver_refuses_a_wrong_state_and_times_out() {
        let receiver = LoopbackReceiver::bind().unwrap();
        let address = receiver.address();
        let browser = std::thread::spawn(move || get(address, "/?state=forged&code=4/x"));
        assert!(matches!(
            receiver.receive("st4te", Duration::from_secs(20)),
            Err(AuthorizeError::StateMismatch)
        ));
        assert!(browser.join().unwrap().starts_with("HTTP/1.1 400"));

        let started = Instant::now();
        assert!(matches!(
            receiver.receive("st4te", Duration::from_millis(200)),
            Err(AuthorizeError::Timeout(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
