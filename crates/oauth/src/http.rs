//! A small blocking HTTP/1.1 client: POST a form, read one bounded answer.
//!
//! Token endpoints need exactly one thing from HTTP: send an
//! `application/x-www-form-urlencoded` POST and read back a small JSON document. This
//! does that over `std::net::TcpStream`, with rustls (the workspace's one crypto
//! provider, `ring`) and the Mozilla roots from `webpki-roots` for https, and
//! `Connection: close` so each request has its own connection: a token is fetched
//! about once an hour per account, so keeping connections alive would buy nothing.
//!
//! Every wait is bounded: connect ([`HttpSettings::connect_timeout`]), each read and
//! write ([`HttpSettings::io_timeout`]) and the whole exchange
//! ([`HttpSettings::request_timeout`], so a peer that trickles a byte at a time cannot
//! hold a delivery thread). The answer's head and body are bounded too
//! ([`HEAD_BYTES_MAX`], [`HttpSettings::body_bytes_max`]).
//!
//! Plain `http://` is allowed only to loopback addresses (tests, a local proxy): a
//! form carrying a client secret or refresh token never crosses a network in clear.
//! Name resolution uses the system resolver (`getaddrinfo`), which has no timeout of
//! its own; the resolver's configured timeouts apply.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use rustls_pki_types::ServerName;
use url::{Host, Url};

use crate::TokenError;

/// Default for [`HttpSettings::connect_timeout`] and [`HttpSettings::io_timeout`]: as
/// long as a slow mobile link may need, short enough that a delivery thread is not held
/// for minutes.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`HttpSettings::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Default for [`HttpSettings::body_bytes_max`]: a token answer is well under 4 KiB;
/// 1 MiB leaves room for any error page while keeping a wrong endpoint from filling
/// memory.
pub const DEFAULT_BODY_BYTES_MAX: usize = 1024 * 1024;
/// Largest status line plus headers accepted: Google's token answers carry about 1 KiB
/// of headers; 16 KiB is what common servers (nginx's large_client_header_buffers
/// order of magnitude) allow, and far more than needed.
pub const HEAD_BYTES_MAX: usize = 16 * 1024;
/// Most interim (1xx) answers skipped before the real one.
const INTERIM_RESPONSES_MAX: usize = 4;

/// Limits of one [`HttpClient`].
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// For each TCP connect attempt.
    pub connect_timeout: Duration,
    /// For each read or write on the socket.
    pub io_timeout: Duration,
    /// For the whole exchange, from connect to the last byte of the answer.
    pub request_timeout: Duration,
    /// Largest answer body accepted; a larger one is an error, not truncated.
    pub body_bytes_max: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_TIMEOUT,
            io_timeout: DEFAULT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            body_bytes_max: DEFAULT_BODY_BYTES_MAX,
        }
    }
}

/// An endpoint URL that may carry secrets: `https://`, or `http://` to a loopback
/// address; no user name or password in it, no fragment.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint(Url);

impl Endpoint {
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let url = Url::parse(text)
            .map_err(|error| TokenError::configuration(format!("endpoint {text:?}: {error}")))?;
        Self::from_url(url)
    }

    pub fn from_url(url: Url) -> Result<Self, TokenError> {
        if !url.username().is_empty() || url.password().is_some() {
            // Not echoed: the user-info may be a secret.
            return Err(TokenError::configuration(
                "an endpoint URL must not contain a user name or password",
            ));
        }
        if url.fragment().is_some() {
            return Err(TokenError::configuration(format!(
                "endpoint {url}: a fragment (#...) makes no sense here"
            )));
        }
        match (url.scheme(), url.host()) {
            ("https", Some(_)) => {}
            ("http", Some(host)) if is_loopback(&host) => {}
            ("http", Some(_)) => {
                return Err(TokenError::configuration(format!(
                    "endpoint {url}: plain http is allowed only to a loopback address; use https"
                )));
            }
            _ => {
                return Err(TokenError::configuration(format!(
                    "endpoint {url}: not an https URL with a host"
                )));
            }
        }
        Ok(Self(url))
    }

    pub fn url(&self) -> &Url {
        &self.0
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Endpoint({})", self.0)
    }
}

fn is_loopback(host: &Host<&str>) -> bool {
    match host {
        Host::Domain(name) => name.eq_ignore_ascii_case("localhost"),
        Host::Ipv4(address) => address.is_loopback(),
        Host::Ipv6(address) => address.is_loopback(),
    }
}

/// An answer: status code and body (the headers are not kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// A blocking HTTP/1.1 client for form POSTs. Cheap to share (`Send + Sync`); each
/// request opens its own connection.
#[derive(Clone)]
pub struct HttpClient {
    settings: HttpSettings,
    tls: Arc<ClientConfig>,
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl HttpClient {
    /// A client that verifies https servers against the Mozilla roots
    /// (`webpki-roots`), TLS 1.3 and 1.2, on the `ring` provider.
    pub fn new(settings: HttpSettings) -> Result<Self, TokenError> {
        let roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|error| TokenError::configuration(format!("TLS configuration: {error}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self::with_tls_config(settings, Arc::new(tls)))
    }

    /// A client with its own TLS configuration (another set of roots).
    pub fn with_tls_config(settings: HttpSettings, tls: Arc<ClientConfig>) -> Self {
        Self { settings, tls }
    }

    pub fn settings(&self) -> &HttpSettings {
        &self.settings
    }

    /// POSTs `fields` as `application/x-www-form-urlencoded` to `endpoint` and returns
    /// the answer, whatever its status. Every failure is [`TokenError::Temporary`]
    /// naming the endpoint, never the fields (they hold secrets).
    pub fn post_form(
        &self,
        endpoint: &Endpoint,
        fields: &[(&str, &str)],
    ) -> Result<HttpResponse, TokenError> {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        self.exchange(endpoint, body.as_bytes())
            .map_err(|error| TokenError::temporary(format!("POST {endpoint}: {error}")))
    }

    fn exchange(&self, endpoint: &Endpoint, body: &[u8]) -> Result<HttpResponse, ExchangeError> {
        let deadline = Instant::now() + self.settings.request_timeout;
        let url = endpoint.url();
        let host = url.host().ok_or(ExchangeError::Refused("no host"))?;
        let addresses = url
            .socket_addrs(|| None)
            .map_err(|error| ExchangeError::Io("resolving the host", error))?;
        let tcp = self.connect(&addresses, deadline)?;
        let mut transport = if url.scheme() == "https" {
            let name = match host {
                Host::Domain(name) => ServerName::try_from(name.to_string())
                    .map_err(|_| ExchangeError::Refused("the host is not a valid DNS name"))?,
                Host::Ipv4(address) => ServerName::from(std::net::IpAddr::V4(address)),
                Host::Ipv6(address) => ServerName::from(std::net::IpAddr::V6(address)),
            };
            let connection = ClientConnection::new(Arc::clone(&self.tls), name)
                .map_err(|error| ExchangeError::Tls(error.to_string()))?;
            Transport::Tls(Box::new(StreamOwned::new(connection, tcp)))
        } else {
            Transport::Plain(tcp)
        };

        let request = request_head(url, body.len());
        transport.set_timeouts(self.io_timeout_until(deadline)?)?;
        transport
            .write_all(request.as_bytes())
            .and_then(|()| transport.write_all(body))
            .and_then(|()| transport.flush())
            .map_err(|error| ExchangeError::Io("sending the request", error))?;
        self.read_response(&mut transport, deadline)
    }

    fn connect(
        &self,
        addresses: &[SocketAddr],
        deadline: Instant,
    ) -> Result<TcpStream, ExchangeError> {
        let mut last_error = None;
        for address in addresses {
            let timeout = self
                .io_timeout_until(deadline)?
                .min(self.settings.connect_timeout);
            match TcpStream::connect_timeout(address, timeout) {
                Ok(stream) => {
                    // One write for the head and one for the body; no need to wait
                    // for an ACK in between.
                    stream
                        .set_nodelay(true)
                        .map_err(|error| ExchangeError::Io("setting TCP_NODELAY", error))?;
                    return Ok(stream);
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(match last_error {
            Some(error) => ExchangeError::Io("connecting", error),
            None => ExchangeError::Refused("the host has no address"),
        })
    }

    /// The timeout for the next socket operation: the per-operation timeout, cut to
    /// what is left of the whole exchange.
    fn io_timeout_until(&self, deadline: Instant) -> Result<Duration, ExchangeError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ExchangeError::RequestTimeout(self.settings.request_timeout));
        }
        Ok(left.min(self.settings.io_timeout))
    }

    fn read_response(
        &self,
        transport: &mut Transport,
        deadline: Instant,
    ) -> Result<HttpResponse, ExchangeError> {
        let limit = HEAD_BYTES_MAX + self.settings.body_bytes_max;
        let mut buffer: Vec<u8> = Vec::with_capacity(8 * 1024);
        let mut chunk = [0u8; 8 * 1024];
        let mut interim_responses = 0;
        let mut eof = false;
        loop {
            // Try to make sense of what has arrived so far.
            if let Some(head) = parse_head(&buffer)? {
                if (100..200).contains(&head.status) {
                    interim_responses += 1;
                    if interim_responses > INTERIM_RESPONSES_MAX {
                        return Err(ExchangeError::Malformed("too many interim (1xx) answers"));
                    }
                    buffer.drain(..head.length);
                    continue;
                }
                let body = buffer.get(head.length..).unwrap_or_default();
                match head.framing {
                    Framing::Length(length) => {
                        if length > self.settings.body_bytes_max {
                            return Err(ExchangeError::BodyTooLarge(self.settings.body_bytes_max));
                        }
                        if body.len() >= length {
                            return Ok(HttpResponse {
                                status: head.status,
                                body: body.get(..length).unwrap_or_default().to_vec(),
                            });
                        }
                        if eof {
                            return Err(ExchangeError::Malformed("the body ended early"));
                        }
                    }
                    Framing::Chunked => {
                        if let Some(decoded) = decode_chunked(body, self.settings.body_bytes_max)? {
                            return Ok(HttpResponse {
                                status: head.status,
                                body: decoded,
                            });
                        }
                        if eof {
                            return Err(ExchangeError::Malformed("the chunked body ended early"));
                        }
                    }
                    Framing::UntilClose => {
                        if body.len() > self.settings.body_bytes_max {
                            return Err(ExchangeError::BodyTooLarge(self.settings.body_bytes_max));
                        }
                        if eof {
                            return Ok(HttpResponse {
                                status: head.status,
                                body: body.to_vec(),
                            });
                        }
                    }
                }
            } else if eof {
                return Err(ExchangeError::Malformed(if buffer.is_empty() {
                    "the server closed the connection without answering"
                } else {
                    "the answer's head ended early"
                }));
            } else if buffer.len() > HEAD_BYTES_MAX {
                return Err(ExchangeError::Malformed("the answer's head is too long"));
            }
            if buffer.len() > limit {
                return Err(ExchangeError::BodyTooLarge(self.settings.body_bytes_max));
            }

            transport.set_timeouts(self.io_timeout_until(deadline)?)?;
            match transport.read(&mut chunk) {
                Ok(0) => eof = true,
                Ok(count) => buffer.extend_from_slice(chunk.get(..count).unwrap_or_default()),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                // A TLS peer that closes without close_notify: the framing above
                // decides whether what came is whole.
                Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => eof = true,
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(if Instant::now() >= deadline {
                        ExchangeError::RequestTimeout(self.settings.request_timeout)
                    } else {
                        ExchangeError::ReadTimeout(self.settings.io_timeout)
                    });
                }
                Err(error) => return Err(ExchangeError::Io("reading the answer", error)),
            }
        }
    }
}

/// The request line and headers of a form POST to `url`.
fn request_head(url: &Url, body_length: usize) -> String {
    let mut target = url.path().to_string();
    if let Some(query) = url.query() {
        target.push('?');
        target.push_str(query);
    }
    let host = url.host_str().unwrap_or_default();
    let authority = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    format!(
        "POST {target} HTTP/1.1\r\nHost: {authority}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {body_length}\r\nAccept: application/json\r\n\
         User-Agent: tsubame/{}\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    )
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Transport {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(stream) => stream,
            Self::Tls(stream) => &stream.sock,
        }
    }

    fn set_timeouts(&self, timeout: Duration) -> Result<(), ExchangeError> {
        let tcp = self.tcp();
        tcp.set_read_timeout(Some(timeout))
            .and_then(|()| tcp.set_write_timeout(Some(timeout)))
            .map_err(|error| ExchangeError::Io("setting socket timeouts", error))
    }
}

impl Read for Transport {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(stream) => stream.read(buffer),
            Self::Tls(stream) => stream.read(buffer),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(stream) => stream.write(buffer),
            Self::Tls(stream) => stream.write(buffer),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(stream) => stream.flush(),
            Self::Tls(stream) => stream.flush(),
        }
    }
}

/// Why one exchange failed; turned into [`TokenError::Temporary`] text.
#[derive(Debug)]
enum ExchangeError {
    Io(&'static str, io::Error),
    Tls(String),
    Refused(&'static str),
    Malformed(&'static str),
    BodyTooLarge(usize),
    ReadTimeout(Duration),
    RequestTimeout(Duration),
}

impl fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(doing, error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                write!(f, "{doing}: timed out")
            }
            Self::Io(doing, error) => write!(f, "{doing}: {error}"),
            Self::Tls(error) => write!(f, "TLS: {error}"),
            Self::Refused(why) => f.write_str(why),
            Self::Malformed(why) => write!(f, "malformed answer: {why}"),
            Self::BodyTooLarge(max) => write!(f, "the answer's body is larger than {max} bytes"),
            Self::ReadTimeout(timeout) => {
                write!(f, "no answer within {} s", timeout.as_secs_f64())
            }
            Self::RequestTimeout(timeout) => {
                write!(
                    f,
                    "the exchange took longer than {} s",
                    timeout.as_secs_f64()
                )
            }
        }
    }
}

/// How the body of an answer ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    status: u16,
    framing: Framing,
    /// Bytes of the status line and headers, the blank line included.
    length: usize,
}

/// The status line and headers at the start of `buffer`, or `None` while the blank
/// line that ends them has not arrived.
fn parse_head(buffer: &[u8]) -> Result<Option<Head>, ExchangeError> {
    let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") else {
        return Ok(None);
    };
    let text = std::str::from_utf8(buffer.get(..end).unwrap_or_default())
        .map_err(|_| ExchangeError::Malformed("the answer's head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(ExchangeError::Malformed("not an HTTP/1.x status line"));
    }
    let status = parts
        .next()
        .filter(|code| code.len() == 3 && code.bytes().all(|byte| byte.is_ascii_digit()))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or(ExchangeError::Malformed("no three-digit status code"))?;
    let mut framing = Framing::UntilClose;
    let mut content_length: Option<usize> = None;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or(ExchangeError::Malformed("a header line without a colon"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding must be chunked for the length to be known (RFC 9112
            // §6.3); anything else (gzip without chunked) we never asked for.
            if value
                .rsplit(',')
                .next()
                .is_some_and(|coding| coding.trim().eq_ignore_ascii_case("chunked"))
            {
                framing = Framing::Chunked;
            } else {
                return Err(ExchangeError::Malformed("an unsupported transfer coding"));
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let length = value
                .parse::<usize>()
                .map_err(|_| ExchangeError::Malformed("an invalid Content-Length"))?;
            if content_length.is_some_and(|earlier| earlier != length) {
                return Err(ExchangeError::Malformed(
                    "conflicting Content-Length headers",
                ));
            }
            content_length = Some(length);
        }
    }
    // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3 item 3).
    if framing != Framing::Chunked
        && let Some(length) = content_length
    {
        framing = Framing::Length(length);
    }
    // 204 and 304 have no body, whatever the headers say.
    if status == 204 || status == 304 {
        framing = Framing::Length(0);
    }
    Ok(Some(Head {
        status,
        framing,
        length: end + 4,
    }))
}

/// Decodes a chunked body (RFC 9112 §7.1) from the start of `body`: `None` while the
/// last chunk has not arrived. Extensions and trailers are read and dropped.
fn decode_chunked(body: &[u8], body_bytes_max: usize) -> Result<Option<Vec<u8>>, ExchangeError> {
    let mut decoded = Vec::new();
    let mut rest = body;
    loop {
        let Some(line_end) = rest.windows(2).position(|window| window == b"\r\n") else {
            if rest.len() > HEAD_BYTES_MAX {
                return Err(ExchangeError::Malformed("a chunk size line is too long"));
            }
            return Ok(None);
        };
        let line = std::str::from_utf8(rest.get(..line_end).unwrap_or_default())
            .map_err(|_| ExchangeError::Malformed("a chunk size line is not text"))?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        if size_text.is_empty() || size_text.len() > 8 {
            return Err(ExchangeError::Malformed("an invalid chunk size"));
        }
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| ExchangeError::Malformed("an invalid chunk size"))?;
        rest = rest.get(line_end + 2..).unwrap_or_default();
        if size == 0 {
            // Trailers, then a blank line.
            loop {
                let Some(end) = rest.windows(2).position(|window| window == b"\r\n") else {
                    return Ok(None);
                };
                if end == 0 {
                    return Ok(Some(decoded));
                }
                rest = rest.get(end + 2..).unwrap_or_default();
            }
        }
        if decoded.len().saturating_add(size) > body_bytes_max {
            return Err(ExchangeError::BodyTooLarge(body_bytes_max));
        }
        let Some(data) = rest.get(..size) else {
            return Ok(None);
        };
        match rest.get(size..size + 2) {
            None | Some(b"\r") => return Ok(None),
            Some(b"\r\n") => {}
            Some(_) => return Err(ExchangeError::Malformed("a chunk is not followed by CRLF")),
        }
        decoded.extend_from_slice(data);
        rest = rest.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let good = [
            "https://oauth2.googleapis.com/token",
            "http://127.0.0.1:8080/token",
            "http://127.0.0.2/token",
            "http://[::1]:9/token",
            "http://localhost:9/token",
        ];
        for text in good {
            assert!(Endpoint::parse(text).is_ok(), "{text}");
        }
        let bad = [
            "http://oauth2.googleapis.com/token",
            "http://192.168.1.1/token",
            "ftp://127.0.0.1/",
            "https://user:hunter2@example.com/token",
            "https://example.com/token#x",
            "not a url",
        ];
        for text in bad {
            let error = Endpoint::parse(text).unwrap_err();
            assert!(
                matches!(error, TokenError::Configuration { .. }),
                "{text}: {error}"
            );
            assert!(!error.to_string().contains("hunter2"), "{error}");
        }
    }

    #[test]
    fn request_head_names_host_and_length() {
        let url = Url::parse("http://127.0.0.1:8080/o/token?x=1").unwrap();
        let head = request_head(&url, 42);
        assert!(head.starts_with("POST /o/token?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(head.contains("Content-Length: 42\r\n"));
        assert!(head.ends_with("Connection: close\r\n\r\n"));
        let url = Url::parse("https://oauth2.googleapis.com/token").unwrap();
        assert!(request_head(&url, 0).contains("Host: oauth2.googleapis.com\r\n"));
    }

    #[test]
    fn heads() {
        type Case = (&'static [u8], Option<(u16, Framing, usize)>);
        let cases: &[Case] = &[
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", None),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                Some((200, Framing::Length(5), 38)),
            ),
            (
                b"HTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                Some((400, Framing::Chunked, 75)),
            ),
            (
                b"HTTP/1.0 500 Oops\r\n\r\n",
                Some((500, Framing::UntilClose, 21)),
            ),
            (b"HTTP/1.1 204\r\n\r\n", Some((204, Framing::Length(0), 16))),
        ];
        for (input, want) in cases {
            let got = parse_head(input)
                .unwrap()
                .map(|head| (head.status, head.framing, head.length));
            assert_eq!(got, *want, "{:?}", String::from_utf8_lossy(input));
        }
        let bad: &[&[u8]] = &[
            b"SMTP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        ];
        for input in bad {
            assert!(
                parse_head(input).is_err(),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn chunked_bodies() {
        let whole = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n";
        assert_eq!(
            decode_chunked(whole, 100).unwrap().as_deref(),
            Some(&b"hello world"[..])
        );
        // Every prefix is incomplete, not an error.
        for end in 0..whole.len() {
            assert_eq!(decode_chunked(&whole[..end], 100).unwrap(), None, "{end}");
        }
        assert!(matches!(
            decode_chunked(b"5\r\nhelloXX", 100),
            Err(ExchangeError::Malformed(_))
        ));
        assert!(matches!(
            decode_chunked(b"zz\r\n", 100),
            Err(ExchangeError::Malformed(_))
        ));
        assert!(matches!(
            decode_chunked(b"ffffffff\r\n", 100),
            Err(ExchangeError::BodyTooLarge(100))
        ));
        assert!(matches!(
            decode_chunked(b"fffffffff\r\n", 100),
            Err(ExchangeError::Malformed(_))
        ));
    }
}
