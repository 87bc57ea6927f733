//! What the delivery engine counts, for `/metrics`: recipients by event, route and
//! upstream; the queue's size; how long delivered mail took from receipt.
//!
//! The dispatcher is the only writer of the event counts (one uncontended lock per
//! event, with integer keys: no allocation); a scrape locks briefly to copy them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tsubame_metrics::Histogram;

use crate::delivery_log::EventKind;

/// Which routing decision sent a recipient to its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteLabel {
    /// The `[[route]]` at this index (0-based; shown 1-based, in config order).
    Rule(usize),
    /// The account's own `upstream`, or `[delivery] default_upstream`.
    Default,
}

impl RouteLabel {
    /// The label value: `1`, `2`, … for the routes in config order; `default`.
    pub fn text(self) -> String {
        match self {
            RouteLabel::Rule(index) => (index + 1).to_string(),
            RouteLabel::Default => "default".to_string(),
        }
    }
}

/// One counted event: what, by which route, through which upstream (by index).
pub type EventKey = (EventKind, RouteLabel, usize);

/// The delivery engine's counters; shared between the dispatcher and the admin server.
#[derive(Debug)]
pub struct RelayStats {
    events: Mutex<HashMap<EventKey, u64>>,
    /// Upstream names by index, as the dispatcher's table has them.
    upstream_names: Mutex<Vec<String>>,
    /// Messages in the queue (not finished).
    queued_messages: AtomicU64,
    /// Recipients waiting to be tried, being tried, waiting for a retry, and on hold.
    ready_recipients: AtomicU64,
    in_flight_recipients: AtomicU64,
    deferred_recipients: AtomicU64,
    held_recipients: AtomicU64,
    /// Messages on hold (`queue hold`).
    held_messages: AtomicU64,
    /// From the message's receipt to its delivery, per delivered recipient.
    delivery_latency: Histogram,
    /// When the dispatcher last finished a round (Unix ms): at least once per second
    /// while it runs, for `/healthz`.
    heartbeat_unix_ms: AtomicU64,
}

/// The queue's size at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    pub messages: u64,
    pub held_messages: u64,
    pub ready: u64,
    pub in_flight: u64,
    pub deferred: u64,
    pub held: u64,
}

impl RelayStats {
    pub(crate) fn new(upstream_names: Vec<String>) -> Self {
        Self {
            events: Mutex::new(HashMap::new()),
            upstream_names: Mutex::new(upstream_names),
            queued_messages: AtomicU64::new(0),
            ready_recipients: AtomicU64::new(0),
            in_flight_recipients: AtomicU64::new(0),
            deferred_recipients: AtomicU64::new(0),
            held_recipients: AtomicU64::new(0),
            held_messages: AtomicU64::new(0),
            delivery_latency: Histogram::latency(),
            heartbeat_unix_ms: AtomicU64::new(crate::now_unix_ms()),
        }
    }

    pub(crate) fn count(&self, key: EventKey) {
        let mut events = self
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *events.entry(key).or_insert(0) += 1;
    }

    pub(crate) fn delivered_after(&self, since_received: Duration) {
        self.delivery_latency.record(since_received);
    }

    /// Milliseconds since the dispatcher last finished a round.
    pub fn since_heartbeat_ms(&self) -> u64 {
        crate::now_unix_ms().saturating_sub(self.heartbeat_unix_ms.load(Ordering::Relaxed))
    }

    /// The queue's size after a round of the dispatcher, which is also its heartbeat.
    pub(crate) fn set_queue(&self, depth: QueueDepth) {
        self.heartbeat_unix_ms
            .store(crate::now_unix_ms(), Ordering::Relaxed);
        self.queued_messages
            .store(depth.messages, Ordering::Relaxed);
        self.held_messages
            .store(depth.held_messages, Ordering::Relaxed);
        self.ready_recipients.store(depth.ready, Ordering::Relaxed);
        self.in_flight_recipients
            .store(depth.in_flight, Ordering::Relaxed);
        self.deferred_recipients
            .store(depth.deferred, Ordering::Relaxed);
        self.held_recipients.store(depth.held, Ordering::Relaxed);
    }

    /// Records a new upstream table (a reload appends upstreams; retired ones keep
    /// their index and name).
    pub(crate) fn set_upstream_names(&self, names: Vec<String>) {
        *self
            .upstream_names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = names;
    }

    /// Every count so far, with the upstream's name, sorted for stable output.
    pub fn events(&self) -> Vec<(EventKind, RouteLabel, String, u64)> {
        let counts: Vec<(EventKey, u64)> = self
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(key, count)| (*key, *count))
            .collect();
        let names = self
            .upstream_names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        // A reload that changes an upstream gives it a new index under the same name;
        // both indexes' counts are that name's (one series, never two with one label set).
        let mut rows: std::collections::BTreeMap<
            (&'static str, RouteLabel, String),
            (EventKind, u64),
        > = std::collections::BTreeMap::new();
        for ((event, route, upstream), count) in counts {
            let name = names
                .get(upstream)
                .cloned()
                .unwrap_or_else(|| format!("#{upstream}"));
            rows.entry((event.as_str(), route, name))
                .or_insert((event, 0))
                .1 += count;
        }
        rows.into_iter()
            .map(|((_, route, name), (event, count))| (event, route, name, count))
            .collect()
    }

    pub fn queue(&self) -> QueueDepth {
        QueueDepth {
            messages: self.queued_messages.load(Ordering::Relaxed),
            held_messages: self.held_messages.load(Ordering::Relaxed),
            ready: self.ready_recipients.load(Ordering::Relaxed),
            in_flight: self.in_flight_recipients.load(Ordering::Relaxed),
            deferred: self.deferred_recipients.load(Ordering::Relaxed),
            held: self.held_recipients.load(Ordering::Relaxed),
        }
    }

    pub fn delivery_latency(&self) -> tsubame_metrics::HistogramSnapshot {
        self.delivery_latency.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_counted_per_route_and_upstream_and_named_on_reading() {
        let stats = RelayStats::new(vec!["relay".to_string(), "mx".to_string()]);
        stats.count((EventKind::Delivered, RouteLabel::Rule(0), 1));
        stats.count((EventKind::Delivered, RouteLabel::Rule(0), 1));
        stats.count((EventKind::Received, RouteLabel::Default, 0));
        stats.count((EventKind::Deferred, RouteLabel::Default, 7));
        let rows = stats.events();
        assert_eq!(
            rows,
            vec![
                (
                    EventKind::Deferred,
                    RouteLabel::Default,
                    "#7".to_string(),
                    1
                ),
                (
                    EventKind::Delivered,
                    RouteLabel::Rule(0),
                    "mx".to_string(),
                    2
                ),
                (
                    EventKind::Received,
                    RouteLabel::Default,
                    "relay".to_string(),
                    1
                ),
            ]
        );
        assert_eq!(RouteLabel::Rule(0).text(), "1");
        // A reload re-adds a changed upstream under its name at a new index: one row.
        stats.set_upstream_names(vec!["relay".into(), "mx".into(), "relay".into()]);
        stats.count((EventKind::Received, RouteLabel::Default, 2));
        let received: Vec<_> = stats
            .events()
            .into_iter()
            .filter(|row| row.0 == EventKind::Received)
            .collect();
        assert_eq!(
            received,
            vec![(
                EventKind::Received,
                RouteLabel::Default,
                "relay".to_string(),
                2
            )]
        );
        assert_eq!(RouteLabel::Default.text(), "default");
    }
}
