//! The admin HTTP server (`[admin]`): `/metrics`, the `/api/…` endpoints, `/healthz` and
//! a web page, on hyper's HTTP/1.1 server in a current-thread tokio runtime of its own
//! thread. Nothing here is on the mail path: a slow scrape or a large CSV export takes
//! this thread and its blocking pool, never an event loop or the dispatcher.
//!
//! Access: when `token_file` is set, every request but the page's static files and
//! `/healthz` needs `Authorization: Bearer TOKEN`. Without a token (loopback only, as
//! the configuration enforces) the `Host` header must name a loopback host, so a web
//! page elsewhere cannot reach the API through DNS rebinding, and a `POST` whose
//! `Origin` is another site is refused (cross-site request forgery).

mod api;
mod metrics;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tsubame_config::Secret;
use tsubame_relay::stats::RelayStats;
use tsubame_spool::Spool;

/// Connections served at once; more wait in the kernel's accept queue.
const CONNECTIONS_MAX: usize = 64;

/// How long a client may take to send a request's header.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest a connection lives, whatever it does: bounds a stalled CSV download.
const CONNECTION_LIFETIME_MAX: Duration = Duration::from_secs(600);

/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How long a stop waits for requests still being answered before it drops them.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// Threads for blocking work (log scans, control-socket requests).
const BLOCKING_THREADS_MAX: usize = 4;

/// Log scans at once (see `State::log_scans`): fewer than the blocking threads, so
/// queue requests always find one.
const LOG_SCANS_MAX: usize = 2;

/// The web page: static files, compiled in (no build step at run time).
const PAGE_HTML: &str = include_str!("page.html");
const PAGE_JS: &str = include_str!("page.js");
const PAGE_CSS: &str = include_str!("page.css");

/// Where the answers come from.
#[derive(Debug, Clone)]
pub struct Sources {
    pub server: tsubame_server::StatsHandle,
    pub relay: Arc<RelayStats>,
    pub spool: Spool,
    pub spool_directory: PathBuf,
    /// The delivery log's current file; `None` when the log is off.
    pub log_path: Option<PathBuf>,
    pub started: SystemTime,
}

#[derive(Debug)]
struct State {
    sources: Sources,
    token: Option<Secret>,
    /// Log scans (pages and CSV exports) running at once: at most
    /// [`LOG_SCANS_MAX`], so slow downloads never take every blocking thread.
    log_scans: Arc<tokio::sync::Semaphore>,
}

/// The running server; [`AdminServer::stop`] ends it.
#[derive(Debug)]
pub struct AdminServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub local_address: SocketAddr,
}

/// Binds `address`: done before the relay starts, so that an address in use stops the
/// start before any mail is accepted.
pub fn bind(address: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(address)
        .with_context(|| format!("admin HTTP: cannot listen on {address}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves on `listener` (from [`bind`]) on a thread of its own.
pub fn start(
    listener: std::net::TcpListener,
    token: Option<Secret>,
    sources: Sources,
) -> anyhow::Result<AdminServer> {
    let local_address = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(BLOCKING_THREADS_MAX)
        .thread_name("admin-blocking")
        .build()
        .context("admin HTTP: cannot start its runtime")?;
    let stop = Arc::new(AtomicBool::new(false));
    let state = Arc::new(State {
        sources,
        token,
        log_scans: Arc::new(tokio::sync::Semaphore::new(LOG_SCANS_MAX)),
    });
    let thread_stop = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("admin-http".to_string())
        .spawn(move || {
            runtime.block_on(accept_loop(listener, state, thread_stop));
            // Connections still open end with the runtime.
            runtime.shutdown_timeout(STOP_WAIT);
        })
        .context("admin HTTP: cannot start its thread")?;
    Ok(AdminServer {
        stop,
        thread: Some(thread),
        local_address,
    })
}

impl AdminServer {
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: std::net::TcpListener, state: Arc<State>, stop: Arc<AtomicBool>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "admin HTTP: cannot use its socket");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    while !stop.load(Ordering::Acquire) {
        let accepted = match tokio::time::timeout(ACCEPT_POLL_INTERVAL, listener.accept()).await {
            Err(_elapsed) => continue,
            Ok(accepted) => accepted,
        };
        let (stream, _peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "admin HTTP: accept failed");
                tokio::time::sleep(ACCEPT_POLL_INTERVAL).await;
                continue;
            }
        };
        // Wait for a free slot, but never past a stop.
        let slot = loop {
            match tokio::time::timeout(ACCEPT_POLL_INTERVAL, Arc::clone(&slots).acquire_owned())
                .await
            {
                Ok(Ok(slot)) => break slot,
                Ok(Err(_closed)) => return,
                Err(_elapsed) if stop.load(Ordering::Acquire) => return,
                Err(_elapsed) => {}
            }
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(&state, request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME_MAX, connection).await;
            drop(slot);
        });
    }
}

/// A response body; an error (a log file that cannot be read mid-export) aborts the
/// response instead of ending it as if it were complete.
pub(crate) type Body = BoxBody<Bytes, std::io::Error>;

/// A body that is all there from the start.
pub(crate) fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never: Infallible| match never {})
        .boxed()
}

async fn handle(state: &Arc<State>, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or_default().to_string();
    // Static files and the health check carry nothing secret.
    let open = matches!(
        path.as_str(),
        "/" | "/index.html" | "/page.js" | "/page.css" | "/favicon.ico" | "/healthz"
    );
    if let Some(refusal) = refuse(state, &request, open) {
        return refusal;
    }
    match (&method, path.as_str()) {
        (&Method::GET, "/" | "/index.html") => static_file(PAGE_HTML, "text/html; charset=utf-8"),
        (&Method::GET, "/page.js") => static_file(PAGE_JS, "text/javascript; charset=utf-8"),
        (&Method::GET, "/page.css") => static_file(PAGE_CSS, "text/css; charset=utf-8"),
        (&Method::GET, "/healthz") => api::healthz(state),
        // Browsers ask for it; there is none.
        (&Method::GET, "/favicon.ico") => {
            let mut response = Response::new(full(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
        // Atomics, a short lock and one directory listing: well under a millisecond,
        // so answered here rather than behind the blocking pool.
        (&Method::GET, "/metrics") => text_response(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics::render(&state.sources),
        ),
        (&Method::GET, "/api/summary") => api::summary(state),
        (&Method::GET, "/api/log") => api::log_page(state, &query).await,
        (&Method::GET, "/api/log.csv") => api::log_csv(state, &query).await,
        (&Method::GET, "/api/queue") => api::queue_page(state, &query).await,
        (_, path) if path.starts_with("/api/queue/") => {
            let rest = path.trim_start_matches("/api/queue/");
            match (&method, rest.split_once('/')) {
                (&Method::GET, None) => api::queue_show(state, rest).await,
                (&Method::POST, Some((id, action))) => api::queue_action(state, id, action).await,
                _ => error_response(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "use GET /api/queue/ID or POST /api/queue/ID/flush|delete|hold|release",
                ),
            }
        }
        (_, "/" | "/index.html" | "/page.js" | "/page.css" | "/healthz" | "/metrics")
        | (_, "/api/log" | "/api/log.csv" | "/api/queue" | "/api/summary") => {
            error_response(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here")
        }
        _ => error_response(
            StatusCode::NOT_FOUND,
            "no such page; see README \"Admin HTTP\"",
        ),
    }
}

/// The answer to a request that may not go on: no or a wrong token, a foreign `Host`,
/// a cross-site `POST`. `None` lets it through.
fn refuse(state: &State, request: &Request<Incoming>, open: bool) -> Option<Response<Body>> {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    match &state.token {
        Some(token) if !open => {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.strip_prefix("Bearer "))
                .map(str::trim);
            if !given.is_some_and(|given| same_secret(given.as_bytes(), token.expose().as_bytes()))
            {
                let mut response = error_response(
                    StatusCode::UNAUTHORIZED,
                    "this server needs Authorization: Bearer TOKEN (the token in [admin] token_file)",
                );
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return Some(response);
            }
        }
        Some(_) => {}
        None => {
            if !is_loopback_host(host) {
                return Some(error_response(
                    StatusCode::FORBIDDEN,
                    "without a token the admin server answers only requests for a loopback host (127.0.0.1, [::1], localhost)",
                ));
            }
        }
    }
    // A browser sends no bearer token by itself, so with a token a forged request
    // fails anyway; without one, a POST from another site's page is refused. The scheme
    // is not compared: behind a TLS proxy the page's origin is https.
    if state.token.is_none() && request.method() != Method::GET && request.method() != Method::HEAD
    {
        let origin_host = headers
            .get(header::ORIGIN)
            .and_then(|value| value.to_str().ok())
            .map(|origin| {
                origin
                    .strip_prefix("http://")
                    .or_else(|| origin.strip_prefix("https://"))
                    .unwrap_or(origin)
            });
        if let Some(origin_host) = origin_host
            && !origin_host.eq_ignore_ascii_case(host)
        {
            return Some(error_response(
                StatusCode::FORBIDDEN,
                "a request from another site's page is refused",
            ));
        }
    }
    None
}

/// Is this `Host` header a loopback host (with or without a port)?
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(name, _)| name)
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Compares in time that depends only on the lengths, not on where they differ.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    given
        .iter()
        .zip(expected)
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

fn static_file(text: &'static str, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from_static(text.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

pub(crate) fn text_response(
    status: StatusCode,
    content_type: &'static str,
    text: String,
) -> Response<Body> {
    respond(status, content_type, full(Bytes::from(text)))
}

/// An answer with `body`: never cached, its type never sniffed.
pub(crate) fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: Body,
) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

pub(crate) fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    text_response(status, "application/json", value.to_string())
}

pub(crate) fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    json_response(status, &serde_json::json!({ "error": message }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_recognised_with_and_without_ports() {
        for host in [
            "127.0.0.1",
            "127.0.0.1:8025",
            "127.1.2.3:80",
            "localhost",
            "LOCALHOST:8025",
            "[::1]",
            "[::1]:8025",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "",
            "example.com",
            "evil.example:8025",
            "192.0.2.1:8025",
            "[2001:db8::1]:8025",
            "localhost.evil.example",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn secrets_compare_equal_only_when_identical() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc"));
        assert!(!same_secret(b"ab", b"abc"));
        assert!(!same_secret(b"", b"abc"));
    }
}
