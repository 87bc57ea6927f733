//! The `/api/…` endpoints and `/healthz`. The log endpoints read the delivery log's
//! files as `tsubame log` does; the queue endpoints ask the dispatcher through the
//! control socket as `tsubame queue` does. Both run on the blocking pool.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::json;
use tsubame_relay::control::{
    self, Action, ControlRequest, ControlResponse, Filter, LIST_PAGE_MAX, Page,
};
use tsubame_relay::delivery_log::files_in_order;

use super::{Body, State, error_response, json_response, respond, text_response};
use crate::log::{LogQuery, csv_fields, write_csv_row};

/// Most events in one page of `/api/log`.
pub(crate) const LOG_PAGE_MAX: usize = 1000;

/// Events or messages in a page when the request names no `limit`.
const PAGE_DEFAULT: usize = 100;

/// Bytes of CSV gathered before they are sent on as one chunk.
const CSV_CHUNK_BYTES: usize = 64 * 1024;

/// Chunks of CSV waiting for a slow client before the reader waits too.
const CSV_CHUNKS_QUEUED: usize = 8;

/// A request's query string, decoded.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(text: &str) -> Self {
        Query(
            url::form_urlencoded::parse(text.as_bytes())
                .map(|(name, value)| (name.into_owned(), value.into_owned()))
                .collect(),
        )
    }

    /// The parameter's value, when given and not empty.
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.trim())
            .filter(|value| !value.is_empty())
    }

    fn number(&self, name: &str, default: usize) -> Result<usize, String> {
        match self.get(name) {
            None => Ok(default),
            Some(text) => text
                .parse()
                .map_err(|_| format!("{name} must be a whole number, not {text:?}")),
        }
    }

    /// Every parameter must be one of `known`: a misspelt filter would otherwise be
    /// silently ignored and return everything.
    fn only(&self, known: &[&str]) -> Result<(), String> {
        match self
            .0
            .iter()
            .find(|(key, _)| !known.contains(&key.as_str()))
        {
            Some((key, _)) => Err(format!(
                "unknown parameter {key:?}; this endpoint takes {}",
                known.join(", ")
            )),
            None => Ok(()),
        }
    }
}

/// The log filters (`/api/log` and `/api/log.csv`).
const LOG_FILTERS: [&str; 8] = [
    "sender",
    "recipient",
    "address",
    "id",
    "status",
    "category",
    "since",
    "until",
];

/// `/api/log`'s parameters: the filters and the page.
const LOG_PARAMETERS: [&str; 11] = [
    LOG_FILTERS[0],
    LOG_FILTERS[1],
    LOG_FILTERS[2],
    LOG_FILTERS[3],
    LOG_FILTERS[4],
    LOG_FILTERS[5],
    LOG_FILTERS[6],
    LOG_FILTERS[7],
    "offset",
    "limit",
    "order",
];

/// The log filters of a query (shared by `/api/log` and `/api/log.csv`).
fn log_query(query: &Query) -> Result<LogQuery, String> {
    let text = |name: &str| query.get(name).map(str::to_string);
    Ok(LogQuery {
        sender: text("sender"),
        recipient: text("recipient"),
        address: text("address"),
        id: text("id"),
        status: query
            .get("status")
            .map(crate::log::parse_event)
            .transpose()
            .map_err(|error| format!("status: {error}"))?,
        category: query
            .get("category")
            .map(crate::log::parse_category)
            .transpose()
            .map_err(|error| format!("category: {error}"))?,
        since: query
            .get("since")
            .map(crate::log::parse_since)
            .transpose()
            .map_err(|error| format!("since: {error}"))?,
        until: query
            .get("until")
            .map(crate::log::parse_until)
            .transpose()
            .map_err(|error| format!("until: {error}"))?,
    })
}

/// The log's files, oldest first; `None` when the log is off (see [`log_off`]).
fn log_files(state: &State) -> Option<Vec<PathBuf>> {
    state.sources.log_path.as_deref().map(files_in_order)
}

fn log_off() -> Response<Body> {
    error_response(
        StatusCode::NOT_FOUND,
        "the delivery log is off ([delivery_log] enabled = false)",
    )
}

/// `GET /api/log`: a page of the events that match, newest first (`order=asc` for
/// oldest first), with the total that match.
pub(super) async fn log_page(state: &Arc<State>, text: &str) -> Response<Body> {
    let query = Query::parse(text);
    let parsed = query.only(&LOG_PARAMETERS).and_then(|()| {
        let filters = log_query(&query)?;
        let offset = query.number("offset", 0)?;
        let limit = query.number("limit", PAGE_DEFAULT)?.min(LOG_PAGE_MAX);
        let ascending = match query.get("order") {
            None | Some("desc") => false,
            Some("asc") => true,
            Some(other) => return Err(format!("order must be asc or desc, not {other:?}")),
        };
        Ok((filters, offset, limit, ascending))
    });
    let (filters, offset, limit, ascending) = match parsed {
        Ok(parsed) => parsed,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, &message),
    };
    let Some(files) = log_files(state) else {
        return log_off();
    };
    let page =
        tokio::task::spawn_blocking(move || read_page(&files, &filters, offset, limit, ascending))
            .await;
    match page {
        Ok(Ok((total, lines))) => {
            // The lines are the log's own JSON objects, parsed once already.
            let mut body = format!(
                "{{\"total\":{total},\"offset\":{offset},\"limit\":{limit},\"order\":\"{}\",\"records\":[",
                if ascending { "asc" } else { "desc" }
            );
            for (position, line) in lines.iter().enumerate() {
                if position > 0 {
                    body.push(',');
                }
                body.push_str(line);
            }
            body.push_str("]}");
            text_response(StatusCode::OK, "application/json", body)
        }
        Ok(Err(error)) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &error),
        Err(_) => error_response(StatusCode::INTERNAL_SERVER_ERROR, "the log search failed"),
    }
}

/// Two passes over the files: count the matches, then keep those in the page. Memory
/// stays at one page whatever the log's size.
fn read_page(
    files: &[PathBuf],
    filters: &LogQuery,
    offset: usize,
    limit: usize,
    ascending: bool,
) -> Result<(usize, Vec<String>), String> {
    // Opened once: a rotation between the passes cannot shift the page.
    let mut opened = crate::log::open_files(files).map_err(|error| format!("{error:#}"))?;
    let mut total = 0usize;
    crate::log::scan_open(&mut opened, filters, |_, _| {
        total += 1;
        Ok(())
    })
    .map_err(|error| format!("{error:#}"))?;
    // The page's range in file order.
    let (first, end) = if ascending {
        (offset.min(total), offset.saturating_add(limit).min(total))
    } else {
        let end = total.saturating_sub(offset);
        (end.saturating_sub(limit), end)
    };
    let mut lines = Vec::with_capacity(end - first);
    let mut index = 0usize;
    crate::log::scan_open(&mut opened, filters, |_, line| {
        if index >= first && index < end {
            lines.push(line.to_string());
        }
        index += 1;
        Ok(())
    })
    .map_err(|error| format!("{error:#}"))?;
    if !ascending {
        lines.reverse();
    }
    Ok((total, lines))
}

/// `GET /api/log.csv`: every match, oldest first, as `tsubame log export --csv` writes
/// it; streamed, so a large export needs no memory of its size.
pub(super) async fn log_csv(state: &Arc<State>, text: &str) -> Response<Body> {
    let query = Query::parse(text);
    let filters = match query.only(&LOG_FILTERS).and_then(|()| log_query(&query)) {
        Ok(filters) => filters,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, &message),
    };
    let Some(files) = log_files(state) else {
        return log_off();
    };
    let Ok(permit) = Arc::clone(&state.log_scans).acquire_owned().await else {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    };
    let (sender, receiver) =
        tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(CSV_CHUNKS_QUEUED);
    tokio::task::spawn_blocking(move || {
        let mut chunk = Vec::with_capacity(CSV_CHUNK_BYTES);
        let _ = write_csv_row(&mut chunk, &crate::log::CSV_HEADER);
        let mut client_gone = false;
        let result = crate::log::scan_files(&files, &filters, |record, _| {
            write_csv_row(&mut chunk, &csv_fields(record))?;
            if chunk.len() >= CSV_CHUNK_BYTES {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(CSV_CHUNK_BYTES));
                if sender.blocking_send(Ok(Bytes::from(full))).is_err() {
                    // The client went away: stop reading.
                    client_gone = true;
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::BrokenPipe,
                        "client gone",
                    ));
                }
            }
            Ok(())
        });
        match result {
            Ok(_) => {
                let _ = sender.blocking_send(Ok(Bytes::from(chunk)));
            }
            Err(_) if client_gone => {}
            Err(error) => {
                let error = format!("{error:#}");
                tracing::warn!(%error, "admin HTTP: CSV export failed; the response is cut off");
                // The client sees a broken response, never a short file that looks whole.
                let _ = sender.blocking_send(Err(std::io::Error::other(error)));
            }
        }
        drop(permit);
    });
    let mut response = respond(
        StatusCode::OK,
        "text/csv; charset=utf-8; header=present",
        ChannelBody { receiver }.boxed(),
    );
    response.headers_mut().insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"tsubame-delivery-log.csv\""),
    );
    response
}

/// A body fed by a channel: ends when the sender is dropped; an error item aborts it.
struct ChannelBody {
    receiver: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.receiver
            .poll_recv(context)
            .map(|chunk| chunk.map(|bytes| bytes.map(Frame::data)))
    }
}

/// Sends one request to the dispatcher over the control socket, off the runtime thread.
async fn control_request(
    state: &Arc<State>,
    request: ControlRequest,
) -> Result<ControlResponse, String> {
    let directory = state.sources.spool_directory.clone();
    tokio::task::spawn_blocking(move || control::request(&directory, &request))
        .await
        .map_err(|_| "the control request failed".to_string())?
}

/// The dispatcher is unhealthy when it has not finished a round for this long; it
/// finishes one at least every second while it runs.
const HEARTBEAT_STALE_MS: u64 = 10_000;

/// `GET /healthz`: 200 while the dispatcher goes round, 503 when it has stalled. Reads
/// an atomic: costs the relay nothing, however often it is asked.
pub(super) fn healthz(state: &Arc<State>) -> Response<Body> {
    let since = state.sources.relay.since_heartbeat_ms();
    if since < HEARTBEAT_STALE_MS {
        text_response(StatusCode::OK, "text/plain", "ok\n".to_string())
    } else {
        text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!(
                "unavailable: the delivery queue has not moved for {} s\n",
                since / 1000
            ),
        )
    }
}

/// The queue's counts (as `/api/queue` reports them), from the dispatcher's last round:
/// no work for the dispatcher, for the page's header.
fn counts(state: &State) -> serde_json::Value {
    let depth = state.sources.relay.queue();
    json!({
        "messages": depth.messages,
        "held_messages": depth.held_messages,
        "ready": depth.ready,
        "in_flight": depth.in_flight,
        "deferred": depth.deferred,
        "held": depth.held,
    })
}

/// `GET /api/summary`: `{"counts": …}`.
pub(super) fn summary(state: &Arc<State>) -> Response<Body> {
    json_response(StatusCode::OK, &json!({ "counts": counts(state) }))
}

/// `GET /api/queue`: a page of the queued messages that match, in id order, with the
/// total that match and the queue's counts.
pub(super) async fn queue_page(state: &Arc<State>, text: &str) -> Response<Body> {
    let query = Query::parse(text);
    let parsed = query
        .only(&[
            "recipient_domain",
            "sender",
            "older_than",
            "status",
            "offset",
            "limit",
        ])
        .and_then(|()| {
            let status = query.get("status").map(str::to_string);
            if let Some(status) = &status
                && !control::FILTER_STATUSES.contains(&status.as_str())
            {
                return Err(format!(
                    "status must be one of {}",
                    control::FILTER_STATUSES.join(", ")
                ));
            }
            let filter = Filter {
                recipient_domain: query.get("recipient_domain").map(str::to_string),
                sender: query.get("sender").map(str::to_string),
                older_than_secs: query
                    .get("older_than")
                    .map(crate::queue::parse_age)
                    .transpose()
                    .map_err(|error| format!("older_than: {error}"))?,
                status,
            };
            let page = Page {
                offset: query.number("offset", 0)?,
                limit: query.number("limit", PAGE_DEFAULT)?.min(LIST_PAGE_MAX),
            };
            Ok((filter, page))
        });
    let (filter, page) = match parsed {
        Ok(parsed) => parsed,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, &message),
    };
    let request = ControlRequest::List {
        filter,
        page: Some(page),
    };
    match control_request(state, request).await {
        Ok(ControlResponse::Messages { messages, total }) => json_response(
            StatusCode::OK,
            &json!({
                "total": total.unwrap_or(messages.len()),
                "offset": page.offset,
                "limit": page.limit,
                "counts": counts(state),
                "messages": messages,
            }),
        ),
        other => control_failure(other),
    }
}

/// `GET /api/queue/ID`.
pub(super) async fn queue_show(state: &Arc<State>, id: &str) -> Response<Body> {
    let request = ControlRequest::Show { id: id.to_string() };
    match control_request(state, request).await {
        Ok(ControlResponse::Messages { mut messages, .. }) if messages.len() == 1 => {
            let message = messages.remove(0);
            json_response(StatusCode::OK, &json!({ "message": message }))
        }
        Ok(ControlResponse::Error { message }) if message.contains("not queued") => {
            error_response(StatusCode::NOT_FOUND, &message)
        }
        Ok(ControlResponse::Error { message }) if message.contains("is not a message id") => {
            error_response(StatusCode::BAD_REQUEST, &message)
        }
        other => control_failure(other),
    }
}

/// `POST /api/queue/ID/ACTION`: flush, delete, hold or release one message.
pub(super) async fn queue_action(state: &Arc<State>, id: &str, action: &str) -> Response<Body> {
    let action = match action {
        "flush" => Action::Flush,
        "delete" => Action::Delete,
        "hold" => Action::Hold,
        "release" => Action::Release,
        other => {
            return error_response(
                StatusCode::NOT_FOUND,
                &format!("no action {other:?}: use flush, delete, hold or release"),
            );
        }
    };
    let request = ControlRequest::Apply {
        action,
        ids: vec![id.to_string()],
    };
    match control_request(state, request).await {
        Ok(ControlResponse::Applied {
            action,
            messages,
            recipients,
            missing,
        }) => {
            if messages == 0 || !missing.is_empty() {
                return error_response(
                    StatusCode::NOT_FOUND,
                    &format!("message {id} is not queued (or not a message id)"),
                );
            }
            tracing::info!(
                id,
                action = action.done_word(),
                "queue action from the admin HTTP server"
            );
            json_response(
                StatusCode::OK,
                &json!({
                    "id": id,
                    "action": action,
                    "result": action.done_word(),
                    "recipients": recipients,
                }),
            )
        }
        other => control_failure(other),
    }
}

fn control_failure(answer: Result<ControlResponse, String>) -> Response<Body> {
    match answer {
        Ok(ControlResponse::Error { message }) => {
            error_response(StatusCode::SERVICE_UNAVAILABLE, &message)
        }
        Err(message) => error_response(StatusCode::SERVICE_UNAVAILABLE, &message),
        Ok(_) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unexpected answer from the delivery queue",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_file(lines: usize) -> (tempfile::TempDir, Vec<PathBuf>) {
        let directory = tempfile::tempdir().expect("tempdir");
        let path = directory.path().join("delivery.log");
        let mut text = String::new();
        for number in 0..lines {
            let event = if number % 2 == 0 {
                "received"
            } else {
                "delivered"
            };
            text.push_str(&format!(
                "{{\"time\":\"2026-11-26T06:30:{:02}.000Z\",\"event\":\"{event}\",\"id\":\"{number:016x}\",\"sender\":\"a@example.com\",\"recipient\":\"r{number}@example.net\",\"upstream\":\"relay\",\"attempt\":0,\"size_bytes\":1,\"since_received_ms\":0}}\n",
                number % 60
            ));
        }
        // A torn last line, as after a crash: not an event.
        text.push_str("{\"time\":\"2026-11-26T06:3");
        std::fs::write(&path, text).expect("write");
        (directory, vec![path])
    }

    fn ids(lines: &[String]) -> Vec<u64> {
        lines
            .iter()
            .map(|line| {
                let value: serde_json::Value = serde_json::from_str(line).expect("JSON");
                u64::from_str_radix(value["id"].as_str().expect("id"), 16).expect("hex")
            })
            .collect()
    }

    #[test]
    fn pages_count_every_match_and_hold_one_page_newest_first() {
        let (_directory, files) = log_file(25);
        let all = LogQuery::default();
        let (total, lines) = read_page(&files, &all, 0, 10, false).expect("page");
        assert_eq!(total, 25);
        assert_eq!(ids(&lines), (15..25).rev().collect::<Vec<_>>());
        let (_, lines) = read_page(&files, &all, 20, 10, false).expect("last page");
        assert_eq!(ids(&lines), vec![4, 3, 2, 1, 0]);
        let (_, lines) = read_page(&files, &all, 30, 10, false).expect("past the end");
        assert!(lines.is_empty());
        let (_, lines) = read_page(&files, &all, 23, 10, true).expect("ascending");
        assert_eq!(ids(&lines), vec![23, 24]);
        let delivered = LogQuery {
            status: Some(tsubame_relay::delivery_log::EventKind::Delivered),
            ..LogQuery::default()
        };
        let (total, lines) = read_page(&files, &delivered, 0, 3, false).expect("filtered");
        assert_eq!(total, 12);
        assert_eq!(ids(&lines), vec![23, 21, 19]);
    }

    #[test]
    fn queries_refuse_unknown_parameters_and_bad_values() {
        let query = Query::parse("adress=x%40example.com");
        let error = query.only(&LOG_PARAMETERS).expect_err("misspelt");
        assert!(error.contains("unknown parameter \"adress\""), "{error}");
        let query = Query::parse("status=sent");
        assert!(log_query(&query).is_err_and(|error| error.starts_with("status: expected one of")));
        let query = Query::parse("limit=ten");
        assert!(query.number("limit", 1).is_err());
        let query = Query::parse(
            "address=bob%40example.com&category=recipient+unknown&since=2026-11-01&limit=",
        );
        let parsed = log_query(&query).expect("valid");
        assert_eq!(parsed.address.as_deref(), Some("bob@example.com"));
        assert_eq!(
            parsed.category.map(|c| c.as_str()),
            Some("recipient unknown")
        );
        assert!(parsed.since.is_some());
        // An empty value is no filter.
        assert_eq!(query.number("limit", 7), Ok(7));
    }
}
